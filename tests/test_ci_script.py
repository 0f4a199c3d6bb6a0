"""`.ci/run`'s install step, with a stand-in Python whose venv records what pip is asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `python -m venv DIR` makes DIR/bin/pip (appends its arguments, one per line, then a blank
# line, to $PIP_LOG) and DIR/bin/python (fails, so .ci/run stops right after installing).
FAKE_PYTHON = """#!/bin/sh
dir="$3"
mkdir -p "$dir/bin"
printf '#!/bin/sh\\nfor a in "$@"; do echo "$a" >> "$PIP_LOG"; done\\necho >> "$PIP_LOG"\\n' \\
  > "$dir/bin/pip"
printf '#!/bin/sh\\nexit 3\\n' > "$dir/bin/python"
chmod +x "$dir/bin/pip" "$dir/bin/python"
"""


def _run(tmp_path: Path, torch_spec: str | None) -> tuple[subprocess.CompletedProcess, list]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_SPEC"}
    env.update(PYTHON=str(python), VENV=str(tmp_path / "venv"), PIP_LOG=str(log))
    if torch_spec is not None:
        env["TORCH_SPEC"] = torch_spec
    (tmp_path / "venv").mkdir()  # an existing one: removed, and said so
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60)
    calls = [c.split("\n") for c in log.read_text().strip("\n").split("\n\n")]
    return proc, calls


@pytest.mark.parametrize(("spec", "want"), [
    (None, ["install", "-q", "torch==2.13.0"]),
    ("torch --index-url https://download.pytorch.org/whl/cpu",
     ["install", "-q", "torch", "--index-url", "https://download.pytorch.org/whl/cpu"]),
    ("", None),
])
def test_torch_spec_is_pip_arguments(tmp_path, spec, want):
    proc, calls = _run(tmp_path, spec)
    assert proc.returncode == 3, proc.stderr  # stopped by the stand-in python, after pip
    assert calls[-1] == ["install", "-q", ".[test]"]
    assert calls[:-1] == ([want] if want else [])
    assert f"removing the existing {tmp_path / 'venv'}" in proc.stdout
