"""`.ci/run`'s install step, with a stand-in Python whose venv records what pip is asked."""

from __future__ import annotations

import os
import shutil
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


# An apt-get that records its arguments, first on PATH: .ci/run may only call it when asked.
FAKE_APT = """#!/bin/sh
echo "$@" >> "$APT_LOG"
"""


def _run(tmp_path: Path, torch_spec: str | None,
         **env_vars: str) -> tuple[subprocess.CompletedProcess, list]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_SPEC", "CI", "ECSERVE_CI_INSTALL")}
    env.update(PYTHON=str(python), VENV=str(tmp_path / "venv"), PIP_LOG=str(log), **env_vars)
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


@pytest.mark.parametrize(("env", "asked"), [
    ({}, False), ({"CI": "true"}, True), ({"ECSERVE_CI_INSTALL": "1"}, True),
    ({"CI": "true", "ECSERVE_CI_INSTALL": "0"}, False),
])
def test_system_packages_only_where_asked(tmp_path, env, asked):
    """On a user's machine (as root, with apt-get) `bash .ci/run` installs no Debian package
    unless CI=true or ECSERVE_CI_INSTALL=1 asks; the tests needing them skip instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # PATH holds the stand-ins and bash's tools only: no promtool or podman is found, so an
    # install would be tried wherever it is allowed.
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "rm", "mkdir", "chmod", "printf", "cat", "sort", "tr", "date"):
        if (found := shutil.which(name)) is not None:
            (tools / name).symlink_to(found)
    apt_log = tmp_path / "apt.log"
    proc, _ = _run(tmp_path, "", APT_LOG=str(apt_log), PATH=f"{bin_dir}:{tools}", **env)
    assert proc.returncode == 3, proc.stderr
    calls = apt_log.read_text().splitlines() if apt_log.exists() else []
    if asked:
        assert any("prometheus" in c for c in calls) and any("haproxy" in c for c in calls)
    else:
        assert calls == [], calls
        assert "not installed: only under CI=true or ECSERVE_CI_INSTALL=1" in proc.stdout
