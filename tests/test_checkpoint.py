"""Checkpoint loading: safetensors only, shards with an index, and precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecserve.config import ConfigError
from ecserve.model.weights import CheckpointError, load_model, load_state_dict, read_config


def rewrite(model_dir: Path, edit) -> None:
    """Apply `edit(state)` to the model's single safetensors file."""
    state = load_file(model_dir / "model.safetensors")
    edit(state)
    save_file(state, model_dir / "model.safetensors")


def test_load_roundtrip_and_bf16(make_model):
    d = make_model()
    saved = load_file(d / "model.safetensors")
    model = load_model(d, read_config(d))
    assert model.state_dict().keys() == saved.keys()
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name]), name
    bf16 = load_model(d, read_config(d), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_sharded_checkpoint_loads_identically(make_model):
    d = make_model()
    state = load_file(d / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_file({n: state[n] for n in part}, d / fname)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "model.safetensors").unlink()
    loaded = load_state_dict(d, read_config(d))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) for n in names)
    # a shard missing, then a tensor the index places in a shard that lacks it
    (d / "model-00002-of-00002.safetensors").rename(d / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=r"missing shard file.*model-00002-of-00002"):
        load_state_dict(d, read_config(d))
    (d / "elsewhere.safetensors").rename(d / "model-00002-of-00002.safetensors")
    weight_map[names[1]] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{names[1]}: listed in the index but absent"):
        load_state_dict(d, read_config(d))


def test_every_problem_is_named_at_once(make_model):
    d = make_model()

    def edit(state):
        del state["layers.1.moe.router"]
        state["layers.9.attn.wq"] = torch.zeros(2)
        state["layers.0.attn.wq"] = torch.zeros(3, 5)
        state["norm.weight"] = torch.zeros(64, dtype=torch.int32)

    rewrite(d, edit)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(d, read_config(d))
    msg = str(err.value)
    assert "missing tensor(s): layers.1.moe.router" in msg
    assert "unexpected tensor(s): layers.9.attn.wq" in msg
    assert "layers.0.attn.wq: shape [3, 5], expected [64, 64]" in msg
    assert "norm.weight: dtype torch.int32, expected a floating-point tensor" in msg


def test_no_pickle_and_missing_files(make_model, tmp_path):
    d = make_model()
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no weights.*safetensors only"):
        load_state_dict(d, read_config(d))
    with pytest.raises(CheckpointError, match=r"config\.json: no such file"):
        read_config(tmp_path / "nowhere")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_config(d)
    (d / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ConfigError, match=r"config.json: config: missing key\(s\) hidden_size"):
        read_config(d)
