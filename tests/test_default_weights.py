"""The embedded default model: deterministic weights, written once to the cache."""

from __future__ import annotations

import torch

from ecserve.model import default
from ecserve.model.weights import expected_tensors, load_model, read_config

SMALL = default.DEFAULT_CONFIG


def test_init_is_deterministic_and_complete():
    a, b = default.init_weights(SMALL, 5), default.init_weights(SMALL, 5)
    c = default.init_weights(SMALL, 6)
    shapes = expected_tensors(SMALL)
    assert {n: tuple(t.shape) for n, t in a.items()} == shapes
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.1.moe.w_up"], c["layers.1.moe.w_up"])


def test_same_seed_same_bytes(tmp_path):
    p1 = default.write_model(tmp_path / "a")
    p2 = default.write_model(tmp_path / "b")
    for f in ("config.json", "model.safetensors"):
        assert (p1 / f).read_bytes() == (p2 / f).read_bytes()
    assert read_config(p1) == SMALL
    load_model(p1, read_config(p1))


def test_default_dir_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ECSERVE_CACHE_DIR", str(tmp_path))
    first = default.default_model_dir()
    assert first.parent == tmp_path / "models"
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert default.default_model_dir() == first
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temp left
