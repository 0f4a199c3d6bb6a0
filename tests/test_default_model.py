"""The default model: the shipped trained model, complete and consistent with its card; and the
seeded random model (`init-model --random`): deterministic weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from ecserve.config import EngineConfig, ModelConfig
from ecserve.model import default
from ecserve.model.checkpoint import expected_tensors
from ecserve.model.weights import load_model, load_state_dict, read_config
from ecserve.train import bpe, presets

CFG = default.RANDOM_CONFIG
TINY = ModelConfig.from_dict(tiny_config())


def test_random_config_matches_the_byte_tokenizer():
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


def test_write_model_defaults_to_the_random_model(tmp_path):
    d = default.write_model(tmp_path / "m")
    assert read_config(d) == CFG
    state = load_state_dict(d, CFG)
    expected = default.init_weights(CFG, default.RANDOM_SEED)
    assert all(torch.equal(state[n], expected[n]) for n in expected)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = default.write_model(tmp_path / "a", TINY, seed=5)
    b = default.write_model(tmp_path / "b", TINY, seed=5)
    c = default.write_model(tmp_path / "c", TINY, seed=6)
    for f in ("config.json", "model.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "config.json").read_bytes() == (c / "config.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_the_shipped_model_is_complete_and_matches_its_card():
    d = default.default_model_dir()
    assert d == default.PACKAGED
    cfg = read_config(d)
    record = json.loads((d / "training.json").read_text())
    # The recipe's own config, served with its default policy.
    want = presets.model_config("ec", record["tokenizer"]["vocab_size"],
                                record["train"]["seq_len"], record["train"]["group_size"],
                                serving=True)
    assert cfg == want and cfg.routing.policy == presets.SERVING_POLICY
    assert bpe.file_sha256(d / "tokenizer.json") == record["tokenizer"]["sha256"]
    card = (d / "README.md").read_text()
    for figure in (f"| {record['held_out']['nats_per_token']:.4f} |",
                   record["corpus"]["sha256"]["train"], record["recipe"]):
        assert figure in card
    assert (d / "model.safetensors").stat().st_size < 32 * 2**20
    state = load_state_dict(d, cfg)
    for layer in cfg.moe_layers:
        theta = state[f"layers.{layer}.moe.threshold"]
        assert theta.dtype == torch.float32 and bool(((theta > 0) & (theta < 1)).all())
        assert theta.tolist() == pytest.approx(record["thresholds"]["calibrated"][str(layer)])
    assert state["embed"].dtype == torch.bfloat16


@pytest.mark.slow
def test_the_shipped_model_writes_python():
    from ecserve.engine.llm import LLM
    from ecserve.types import SamplingParams

    llm = LLM(config=EngineConfig(device="cpu"))
    (out,) = llm.generate(["def read_file(path):"], SamplingParams(max_new_tokens=48))
    text = "def read_file(path):" + out.text
    assert "\n    " in text and "return" in text, text  # an indented body that returns


def test_transformers_autotokenizer_loads_the_shipped_tokenizer():
    """Tools built on transformers (guidellm, lm-eval) load it from the model directory."""
    from transformers import AutoTokenizer

    from ecserve.tokenizer import load_tokenizer

    d = default.default_model_dir()
    ours = load_tokenizer(d, "huggingface", 0, 1)
    theirs = AutoTokenizer.from_pretrained(str(d))
    text = "def read_file(path):\n    return open(path).read()\n"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (0, 1)
