"""The embedded default model: deterministic random weights, written once into the cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from ecserve.config import ModelConfig
from ecserve.model import default
from ecserve.model.weights import expected_tensors, load_model, load_state_dict, read_config

CFG = default.DEFAULT_CONFIG
TINY = ModelConfig.from_dict(tiny_config())


def test_default_config_matches_the_byte_tokenizer():
    assert CFG.tokenizer == "byte" and CFG.vocab_size == 258
    assert (CFG.bos_token_id, CFG.eos_token_id) == (256, 257)
    assert CFG.moe_layers == (1, 3)


@pytest.mark.parametrize("cfg", [CFG, TINY], ids=["default", "tiny"])
def test_init_weights_covers_every_tensor_with_its_shape(cfg):
    state = default.init_weights(cfg, 0)
    assert {n: tuple(t.shape) for n, t in state.items()} == expected_tensors(cfg)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    for name, t in state.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        else:
            assert t.std() > 0, name  # random, not a constant


def test_init_weights_is_deterministic_per_seed():
    a, b = default.init_weights(TINY, 7), default.init_weights(TINY, 7)
    c = default.init_weights(TINY, 8)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(a[name], c[name]), name


def test_init_weights_ignores_the_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = default.init_weights(TINY, 7)
        torch.manual_seed(1)
        b = default.init_weights(TINY, 7)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_write_model_writes_a_loadable_directory(tmp_path):
    d = default.write_model(tmp_path / "m", TINY, seed=4)
    assert d == tmp_path / "m"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = read_config(d)
    assert cfg == TINY
    model = load_model(d, cfg)
    expected = default.init_weights(TINY, 4)
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())


def test_write_model_defaults_to_the_embedded_model(tmp_path):
    d = default.write_model(tmp_path / "m")
    assert read_config(d) == CFG
    state = load_state_dict(d, CFG)
    expected = default.init_weights(CFG, default.DEFAULT_SEED)
    assert all(torch.equal(state[n], expected[n]) for n in expected)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = default.write_model(tmp_path / "a", TINY, seed=5)
    b = default.write_model(tmp_path / "b", TINY, seed=5)
    c = default.write_model(tmp_path / "c", TINY, seed=6)
    for f in ("config.json", "model.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "config.json").read_bytes() == (c / "config.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_default_model_dir_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path))
    first = default.default_model_dir()
    assert first.parent == tmp_path / "models" and first.name.startswith("default-")
    assert read_config(first) == CFG
    weights = first / "model.safetensors"
    stat = weights.stat()

    def no_rewrite(*args, **kwargs):
        raise AssertionError("default model written a second time")

    monkeypatch.setattr(default, "write_model", no_rewrite)
    assert default.default_model_dir() == first
    after = weights.stat()
    assert (after.st_mtime_ns, after.st_ino) == (stat.st_mtime_ns, stat.st_ino)
    # the temporary directory it was written into is gone
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]


def test_default_model_dir_is_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path))
    d = default.default_model_dir()
    ref = default.write_model(tmp_path / "ref")
    for f in ("config.json", "model.safetensors"):
        assert (d / f).read_bytes() == (ref / f).read_bytes(), f
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 258


def test_cache_root_falls_back_to_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ECSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default.cache_root() == tmp_path / "xdg" / "ecserve"
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert default.cache_root() == tmp_path / "mine"
