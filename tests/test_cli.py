"""The `ecserve` command: `init-model` and `generate`, run as `python -m ecserve`, plus a few
cases through `ecserve.cli.main` in-process (no interpreter start-up). The seeded random model
keeps these fast; test_default_model.py has the shipped one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecserve.cli import main
from ecserve.config import EngineConfig
from ecserve.engine.llm import LLM
from ecserve.model.default import RANDOM_CONFIG, default_model_dir, init_weights, write_model
from ecserve.model.weights import load_state_dict, read_config
from ecserve.types import SamplingParams


def ecserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "ecserve", *args], capture_output=True,
                          encoding="utf-8", env=env, timeout=120)


@pytest.fixture(scope="module")
def init_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    model = tmp_path_factory.mktemp("cli") / "model"
    return model, ecserve("init-model", str(model), "--random")


@pytest.fixture(scope="module")
def model_dir(init_run) -> Path:
    model, res = init_run
    assert res.returncode == 0, res.stderr
    return model


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    """The same model in-process, configured as `generate --device cpu` configures it."""
    return LLM(model_dir, EngineConfig(device="cpu"))


def test_init_model_random_writes_the_seeded_model(init_run):
    model, res = init_run
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {model}\n"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert read_config(model) == RANDOM_CONFIG


def test_init_model_seed_in_process(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--random", "--seed", "5"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm'}\n"
    state = load_state_dict(tmp_path / "m", RANDOM_CONFIG)
    expected = init_weights(RANDOM_CONFIG, 5)
    assert all(torch.equal(state[n], expected[n]) for n in expected)


def test_generate_greedy(model_dir, llm):
    res = ecserve("generate", "--model", str(model_dir), "hello", "--max-new-tokens", "5",
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr
    (expected,) = llm.generate("hello", SamplingParams(max_new_tokens=5))
    assert len(expected.token_ids) == 5
    assert res.stdout == expected.text + "\n"  # the streamed text, then a newline
    assert "[5 tokens, finish: length, seed: " in res.stderr
    assert "Traceback" not in res.stderr


def test_one_token_is_singular_and_the_help_gives_the_default(model_dir):
    res = ecserve("generate", "--model", str(model_dir), "hello", "--max-new-tokens", "1",
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "[1 token, finish: length, seed: " in res.stderr
    assert "Most tokens to generate (default: 64)." in " ".join(
        ecserve("generate", "--help").stdout.split())


def test_generate_with_a_seed_is_reproducible(model_dir, llm):
    # temperature 5: the default model's distributions are so peaked that at 1.0 every seed
    # gives the same tokens, and the test could not tell a seed from no seed.
    args = ("generate", "--model", str(model_dir), "hello", "--max-new-tokens", "12",
            "--temperature", "5.0", "--seed", "3", "--device", "cpu")
    runs = [ecserve(*args) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "[12 tokens, finish: length, seed: 3]" in r.stderr
    assert runs[0].stdout == runs[1].stdout
    same, other = (llm.generate("hello", SamplingParams(max_new_tokens=12, temperature=5.0,
                                                        seed=s))[0] for s in (3, 4))
    assert runs[0].stdout == same.text + "\n"
    assert other.token_ids != same.token_ids  # the seed matters at this temperature


def test_generate_missing_model_dir(tmp_path):
    missing = tmp_path / "nonexistent"
    res = ecserve("generate", "--model", str(missing), "x")
    assert res.returncode == 2
    assert res.stderr.startswith("ecserve: error: ")
    assert str(missing / "config.json") in res.stderr and "no such file" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""  # no fallback to the default


def test_generate_past_the_context_in_process(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "hello", "--max-new-tokens", "100000",
               "--device", "cpu"])
    assert rc == 2
    out = capsys.readouterr()
    assert out.out == ""
    # BOS + 5 bytes of "hello"
    assert out.err.startswith("ecserve: error: prompt (6 tokens) + max_new_tokens (100000)")
    assert "exceeds the context of 2048 tokens" in out.err


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--min-new-tokens", "9", "--max-new-tokens", "8"], "min_new_tokens must be in [0, "),
    (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["--seed", "-1"], "seed must be in [0, 2**63)"),
    (["--block-size", "0"], "block_size must be > 0, got 0"),
    (["--kv-cache-memory-fraction", "2"], "kv_cache_memory_fraction must be in (0, 1], got 2.0"),
    (["--max-model-len", "4096", "--device", "cpu"],
     "max_model_len=4096 exceeds the model's max_position_embeddings=2048"),
])
def test_bad_flags_exit_2_naming_the_field(model_dir, capsys, args, message):
    assert main(["generate", "--model", str(model_dir), "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecserve: error: ") and message in err


@pytest.mark.parametrize("argv", [
    [], ["generate"], ["init-model"], ["client"], ["serve", "--port", "x"],
    ["generate", "x", "--dtype", "float64"],
    ["generate", "x", "--routing-scope", "global"], ["generate", "x", "--max-new-tokens", "a"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: ecserve" in capsys.readouterr().err


def test_init_model_output_equals_write_model(model_dir, tmp_path):
    ref = write_model(tmp_path / "ref")
    for f in ("config.json", "model.safetensors"):
        assert (model_dir / f).read_bytes() == (ref / f).read_bytes(), f


def test_init_model_copies_the_shipped_model_readable_by_all(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm'}\n"
    shipped = default_model_dir()
    names = sorted(p.name for p in shipped.iterdir() if p.is_file())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == names
    for name in names:
        copy = tmp_path / "m" / name
        assert copy.read_bytes() == (shipped / name).read_bytes(), name
        assert copy.stat().st_mode & 0o444 == 0o444, name  # a container's other uid reads it
    assert main(["init-model", str(tmp_path / "m")]) == 2  # never over an existing directory
    assert main(["init-model", str(tmp_path / "n"), "--seed", "3"]) == 2
    assert "--seed chooses random weights: it needs --random" in capsys.readouterr().err


def test_init_model_onto_a_file_is_an_error(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(["init-model", str(target)]) == 2
    assert "ecserve: error:" in capsys.readouterr().err


def test_health_and_client_do_not_import_torch():
    """The container's HEALTHCHECK runs `ecserve health` every 15 s: it must stay light."""
    code = ("import sys\nfrom ecserve.cli import main\n"
            "main(['health', '--address', '127.0.0.1:1', '--timeout', '0.5'])\n"
            "main(['client', 'x', '--address', '127.0.0.1:1', '--timeout', '0.5'])\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


@pytest.mark.parametrize(("env", "want"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_one_openmp_wait_policy_for_every_entry_point(env, want):
    """Set by the package, before torch loads OpenMP, for serve, generate, plan, train and
    LLM() alike; the environment's own setting wins."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, ecserve, torch; from ecserve.cli import main; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=base if env is None else {**base, "OMP_WAIT_POLICY": env})
    assert res.stdout.strip() == want, res.stderr
