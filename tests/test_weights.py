"""Checkpoint directories: loading single-file and sharded safetensors, and errors that name
the tensor or file at fault (all problems in one message)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from ecserve.config import ConfigError, ModelConfig
from ecserve.model.checkpoint import CheckpointError, expected_tensors
from ecserve.model.default import init_weights
from ecserve.model.weights import load_model, load_state_dict, read_config, save_model

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def edit_weights(model_dir: Path, edit) -> None:
    """Rewrite the single safetensors file after `edit(state)`."""
    state = load_file(model_dir / WEIGHTS)
    edit(state)
    save_file(state, model_dir / WEIGHTS)


def shard(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split model.safetensors over two shards with an index; return (state, weight_map)."""
    state = load_file(model_dir / WEIGHTS)
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in parts.items():
        save_file({n: state[n] for n in part}, model_dir / fname)
    weight_map = {n: f for f, part in parts.items() for n in part}
    write_index(model_dir, weight_map)
    (model_dir / WEIGHTS).unlink()
    return state, weight_map


def write_index(model_dir: Path, weight_map: dict[str, str]) -> None:
    (model_dir / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_error(model_dir: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_state_dict(model_dir, read_config(model_dir))
    return str(err.value)


# ---------------------------------------------------------------- loading


def test_saved_model_loads_with_the_saved_values(make_model):
    d = make_model(seed=3)
    cfg = read_config(d)
    assert cfg == ModelConfig.from_dict(tiny_config())
    saved = init_weights(cfg, 3)
    model = load_model(d, cfg)
    state = model.state_dict()
    assert state.keys() == saved.keys() == expected_tensors(cfg).keys()
    for name, t in state.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu", name
        assert torch.equal(t, saved[name]), name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_load_state_dict_matches_the_file(make_model):
    d = make_model()
    on_disk = load_file(d / WEIGHTS)
    loaded = load_state_dict(d, read_config(d))
    assert loaded.keys() == on_disk.keys()
    assert all(torch.equal(loaded[n], on_disk[n]) for n in on_disk)


def test_sharded_checkpoint_loads_identically(make_model):
    d = make_model(seed=1)
    cfg = read_config(d)
    single = load_state_dict(d, cfg)
    state, weight_map = shard(d)
    assert not (d / WEIGHTS).exists() and len(set(weight_map.values())) == 2
    sharded = load_state_dict(d, cfg)
    assert sharded.keys() == single.keys() == state.keys()
    assert all(torch.equal(sharded[n], single[n]) for n in single)
    model = load_model(d, cfg)
    assert all(torch.equal(t, single[n]) for n, t in model.state_dict().items())


def test_index_wins_over_a_stale_single_file(make_model):
    d = make_model(seed=1)
    cfg = read_config(d)
    state, _ = shard(d)
    # a single file with other values next to the index: the index is what gets loaded
    save_model(d, cfg, {n: torch.zeros_like(t) for n, t in state.items()})
    loaded = load_state_dict(d, cfg)
    assert all(torch.equal(loaded[n], state[n]) for n in state)


def test_load_model_in_bfloat16(make_model):
    d = make_model()
    cfg = read_config(d)
    saved = load_file(d / WEIGHTS)
    model = load_model(d, cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name].to(torch.bfloat16)), name


def test_bfloat16_config_saves_and_loads_bfloat16(make_model):
    d = make_model(dtype="bfloat16")
    assert {t.dtype for t in load_file(d / WEIGHTS).values()} == {torch.bfloat16}
    model = load_model(d, read_config(d))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_float64_tensors_are_cast_to_the_model_dtype(make_model):
    d = make_model()
    edit_weights(d, lambda s: s.update(embed=s["embed"].double()))
    model = load_model(d, read_config(d))
    assert model.embed.dtype == torch.float32  # type: ignore[union-attr]


# ---------------------------------------------------------------- tensor errors


def test_missing_tensor_is_named(make_model):
    d = make_model()
    edit_weights(d, lambda s: s.pop("layers.1.moe.router"))
    msg = load_error(d)
    assert msg.startswith(f"{d}: ")
    assert "missing tensor(s): layers.1.moe.router" in msg
    assert "unexpected" not in msg


def test_unexpected_tensor_is_named(make_model):
    d = make_model()
    edit_weights(d, lambda s: s.update({"lm_head.weight": torch.zeros(258, 64)}))
    msg = load_error(d)
    assert "unexpected tensor(s): lm_head.weight" in msg and "missing" not in msg


def test_shape_mismatch_names_both_shapes(make_model):
    d = make_model()
    edit_weights(d, lambda s: s.update({"layers.0.attn.wk": torch.zeros(64, 64)}))
    assert "layers.0.attn.wk: shape [64, 64], expected [32, 64]" in load_error(d)


def test_transposed_tensor_is_a_shape_mismatch(make_model):
    d = make_model()
    name = "layers.1.moe.w_down"
    edit_weights(d, lambda s: s.update({name: s[name].mT.contiguous()}))
    assert "layers.1.moe.w_down: shape [4, 48, 64], expected [4, 64, 48]" in load_error(d)


def test_integer_tensor_is_refused(make_model):
    d = make_model()
    edit_weights(d, lambda s: s.update({"norm.weight": torch.ones(64, dtype=torch.int64)}))
    msg = load_error(d)
    assert "norm.weight: dtype torch.int64, expected a floating-point tensor" in msg


def test_all_problems_are_reported_together(make_model):
    d = make_model()

    def edit(state):
        del state["embed"], state["layers.3.moe.w_up"]
        state["layers.4.attn.wq"] = torch.zeros(64, 64)
        state["layers.0.ffn.w_gate"] = torch.zeros(96, 65)
        state["layers.2.ffn_norm.weight"] = torch.zeros(64, dtype=torch.int32)

    edit_weights(d, edit)
    msg = load_error(d)
    assert "missing tensor(s): embed, layers.3.moe.w_up" in msg
    assert "unexpected tensor(s): layers.4.attn.wq" in msg
    assert "layers.0.ffn.w_gate: shape [96, 65], expected [96, 64]" in msg
    assert "layers.2.ffn_norm.weight: dtype torch.int32" in msg


def test_checkpoint_for_a_different_architecture(make_model):
    # weights of a 2-expert model under a config that says 4 experts: every expert tensor
    d = make_model(num_experts=2, routing={"group_size": 2})
    (d / "config.json").write_text(json.dumps(tiny_config()))
    msg = load_error(d)
    for layer in (1, 3):
        for w, rest in (("router", "[2, 64], expected [4, 64]"),
                        ("w_gate", "[2, 48, 64], expected [4, 48, 64]")):
            assert f"layers.{layer}.moe.{w}: shape {rest}" in msg


# ---------------------------------------------------------------- shard errors


def test_index_naming_a_missing_shard_file(make_model):
    d = make_model()
    shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(d)
    assert str(d / INDEX) in msg
    assert f"missing shard file(s): {d / 'model-00002-of-00002.safetensors'}" in msg
    assert "00001" not in msg


def test_index_listing_a_tensor_absent_from_its_shard(make_model):
    d = make_model()
    _, weight_map = shard(d)
    moved = next(n for n, f in weight_map.items() if f.startswith("model-00002"))
    weight_map[moved] = "model-00001-of-00002.safetensors"
    write_index(d, weight_map)
    msg = load_error(d)
    assert f"{moved}: listed in the index but absent from model-00001-of-00002.safetensors" in msg


def test_index_missing_a_tensor(make_model):
    d = make_model()
    _, weight_map = shard(d)
    del weight_map["norm.weight"]
    write_index(d, weight_map)
    assert "missing tensor(s): norm.weight" in load_error(d)


@pytest.mark.parametrize("text", ["{oops", json.dumps({"metadata": {}}), json.dumps([1])])
def test_unreadable_index(make_model, text):
    d = make_model()
    shard(d)
    (d / INDEX).write_text(text)
    msg = load_error(d)
    assert msg.startswith(f"{d / INDEX}: expected JSON with a 'weight_map' object")


# ---------------------------------------------------------------- files


def test_no_weights_file(make_model):
    d = make_model()
    (d / WEIGHTS).unlink()
    msg = load_error(d)
    assert msg.startswith(f"{d}: no weights")
    assert WEIGHTS in msg and INDEX in msg and "safetensors only" in msg


def test_pytorch_bin_is_not_unpickled(make_model, monkeypatch):
    d = make_model()
    torch.save(load_file(d / WEIGHTS), d / "pytorch_model.bin")
    (d / WEIGHTS).unlink()

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert re.search(r"no weights.*pickle formats are not loaded", load_error(d))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(d, read_config(d))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError) as err:
        read_config(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'}: no such file")
    with pytest.raises(CheckpointError, match="no such file"):
        read_config(tmp_path / "does-not-exist")


def test_invalid_json_config(make_model):
    d = make_model()
    (d / "config.json").write_text('{"vocab_size": 258,}')
    with pytest.raises(CheckpointError) as err:
        read_config(d)
    assert str(err.value).startswith(f"{d / 'config.json'}: not valid JSON: ")
    assert isinstance(err.value.__cause__, json.JSONDecodeError)


def test_config_error_names_the_config_path(make_model):
    d = make_model()
    data = json.loads((d / "config.json").read_text())
    data["routing"]["policy"] = "switch"
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        read_config(d)
    msg = str(err.value)
    assert msg.startswith(f"{d / 'config.json'}: routing.policy: 'switch' is not one of")
    assert not isinstance(err.value, CheckpointError)


def test_save_model_writes_the_config_and_the_tensors(tmp_path):
    cfg = ModelConfig.from_dict(tiny_config(moe_layers=[0]))
    state = init_weights(cfg, 0)
    save_model(tmp_path / "new" / "dir", cfg, state)
    assert read_config(tmp_path / "new" / "dir") == cfg
    on_disk = load_file(tmp_path / "new" / "dir" / WEIGHTS)
    assert on_disk.keys() == state.keys()
    assert all(torch.equal(on_disk[n], state[n]) for n in state)


@pytest.mark.parametrize("weight_map", [["embed"], {"embed": 3}])
def test_malformed_weight_map(make_model, weight_map):
    d = make_model()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to shard"):
        load_state_dict(d, read_config(d))


def test_corrupt_safetensors_names_the_file(make_model):
    d = make_model()
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_state_dict(d, read_config(d))
