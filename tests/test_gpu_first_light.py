"""bench/gpu_first_light.py's rehearsal: every part runs on the CPU at small shapes (Triton's
interpreter), so the script a lent GPU will run once has run, as the code is now."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "first-light"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_first_light.py"), "--dry-run",
                           "--out", str(out), "--budget-s", "240"],
                          capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert proc.returncode == 0, proc.stdout + proc.stderr + json.dumps(parts, indent=1)[-4000:]
    assert list(parts) == ["device", "pytest_gpu", "greedy", "bench_kernels", "serving_graphs",
                           "serving_eager", "compiled_decode"]
    assert {n for n, p in parts.items() if p["status"] != "ok"} == {"compiled_decode"}
    assert "CPUs only" in parts["compiled_decode"]["detail"]
    greedy = json.loads((out / "greedy.json").read_text())
    for model in ("default", "tiny Mixtral"):  # the interpreter's kernels equal the torch path
        assert set(greedy[model]["agreement"].values()) == {"2/2 sequences identical"}
    assert json.loads((out / "bench_kernels.json").read_text())
    for name in ("serving_graphs", "serving_eager"):
        assert json.loads((out / f"{name}.json").read_text())["sweep"]
    assert "tests/kernels" in parts["pytest_gpu"]["command"]
