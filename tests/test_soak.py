"""bench/soak.py for 60 s (docs/deployment.md gives a 10-minute run): twice the server's
capacity with cancellations, deadlines and slow readers; no INTERNAL or UNKNOWN, every KV block
free after, SIGTERM exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_sixty_seconds_at_twice_capacity(tmp_path):
    out = subprocess.run([sys.executable, str(SOAK), "--duration", "60", "--json",
                          str(tmp_path / "soak.json")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    assert all(report["checks"].values()), report["checks"]
    statuses = report["statuses"]
    assert statuses.get("OK", 0) > 0 and statuses.get("CANCELLED", 0) > 0
    assert sum(statuses.values()) == sum(report["sent"].values())  # every call settled
    for v in report["rss"].values():  # a gross leak would show in a minute
        assert v["at_end"] < 1.5 * v["at_a_tenth"], report["rss"]
