"""docs/cli.md and docs/benchmarks.md are generated (python docs/generate.py): the committed
pages must be what the code and bench/results give today."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_are_current():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_page_lists_every_subcommand_and_flag():
    from ecserve.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text()
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        flags = [o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")]
        section = page.split(f"\n## ecserve {name}\n", 1)[1].split("\n## ", 1)[0]
        missing = [f for f in flags if f"`{f}" not in section]
        assert not missing, (name, missing)
