"""Model files a server running as another user can read (a container's uid 10001), and a
precise error naming the file and the user when it cannot."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import tiny_config

from ecserve.config import ModelConfig
from ecserve.model import default
from ecserve.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ecserve.model.weights import load_state_dict, read_config
from ecserve.tokenizer import load_tokenizer

TINY = ModelConfig.from_dict(tiny_config())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_weights_are_readable_by_everyone(tmp_path, umask_022):
    d = default.write_model(tmp_path / "random", TINY, seed=1)  # safetensors alone: 0600
    assert mode(d / WEIGHTS_FILE) == mode(d / CONFIG_FILE) == 0o644
    shipped = default.copy_default_model(tmp_path / "copy")
    assert all(mode(f) & 0o444 == 0o444 for f in shipped.iterdir())


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"])
def test_an_unreadable_file_is_named_with_the_user(tmp_path, monkeypatch, name):
    d = default.copy_default_model(tmp_path / "m")
    cfg = read_config(d)
    real = os.access
    # As root every file is readable: pretend this one is not (os.access is what is asked).
    monkeypatch.setattr(os, "access", lambda p, m: real(p, m) and str(p) != str(d / name))
    with pytest.raises(PermissionError) as err:
        if name == "tokenizer.json":
            load_tokenizer(d, "huggingface", cfg.bos_token_id, cfg.eos_token_id)
        else:
            load_state_dict(d, read_config(d))
    msg = str(err.value)
    assert msg.startswith(f"{d / name}: not readable by user ")
    assert f"(uid {os.geteuid()})" in msg and "chmod a+r" in msg
