"""The `ecserve` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ecserve.cli import main


def ecserve(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ECSERVE_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "ecserve", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_init_model_then_generate(tmp_path):
    model = tmp_path / "m"
    res = ecserve("init-model", str(model), cache=tmp_path)
    assert res.returncode == 0 and (model / "config.json").is_file()
    assert (model / "model.safetensors").is_file()
    args = ("generate", "--model", str(model), "hello", "--max-new-tokens", "5",
            "--temperature", "1.0", "--seed", "11")
    runs = [ecserve(*args, cache=tmp_path) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "[5 tokens, finish: length, seed: 11]" in r.stderr
    assert runs[0].stdout == runs[1].stdout


def test_generate_on_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path))
    assert main(["generate", "Expert choice", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "[4 tokens, finish: length" in out.err
    assert any((tmp_path / "models").iterdir())


def test_errors_exit_2_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path))
    assert main(["generate", "--model", str(tmp_path / "absent"), "x"]) == 2
    assert f"ecserve: error: {tmp_path / 'absent' / 'config.json'}: no such file" in (
        capsys.readouterr().err)
    assert main(["generate", "x", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens (100000)" in err and "exceeds the context of 2048 tokens" in err
    assert main(["generate", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1], got 0.0" in capsys.readouterr().err
