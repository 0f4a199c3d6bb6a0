"""Hugging Face MoE checkpoints served by ecserve equal transformers (float32, CPU).

For each supported model type, a tiny random model is saved with save_pretrained (sharded, so
the index path is used) and loaded in place by ecserve. Logits at every prompt position, at
every decode step (against transformers' own KV-cached decoding), and greedy generations agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import BOS, EOS, TYPES, build, byte_tokenizer

from ecserve.config import ConfigError, EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.checkpoint import CheckpointError
from ecserve.model.weights import load_state_dict, read_config
from ecserve.types import Request, SamplingParams

ATOL = 1e-4
NEW_TOKENS = 16
ENGINE = EngineConfig(device="cpu", record_steps=True, kv_cache_bytes=1 << 22, block_size=4,
                      max_num_batched_tokens=64, max_num_seqs=8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _prompts(n: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (length,), generator=gen).tolist() for length in (7, 20, 33)][:n]


def _run(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    tokens = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
    return tokens


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_logits_and_greedy_generations_equal_transformers(tmp_path: Path, model_type: str):
    hf, model_dir = build(model_type, tmp_path / model_type, shard=True)
    assert (model_dir / "model.safetensors.index.json").is_file()
    engine = Engine(model_dir, ENGINE)
    assert engine.model_cfg.model_type == model_type
    assert engine.model_cfg.routing.policy == "token_choice"
    prompts = _prompts()

    # Prefill: every prefix of the longest prompt as its own request, batched together; each
    # request's sampled row is the logits after its last token.
    longest = prompts[-1]
    prefixes = [Request(f"p{i}", tuple(longest[:i + 1]), SamplingParams(max_new_tokens=1))
                for i in range(len(longest))]
    _run(engine, prefixes)
    with torch.no_grad():
        want = hf(torch.tensor([longest])).logits[0]  # [T, V]
    got = torch.stack([next(r.logits[f"p{i}"] for r in engine.records if f"p{i}" in r.logits)
                       for i in range(len(longest))])  # [T, V]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # Decode: concurrent requests (one in sequence scope), greedy, against HF's cached decode.
    engine.records.clear()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [Request(f"r{i}", tuple(p), params, routing_scope="sequence" if i == 1 else None)
            for i, p in enumerate(prompts)]
    tokens = _run(engine, reqs)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert out.sequences[0, len(p):].tolist() == tokens[f"r{i}"]
        steps = [rec.logits[f"r{i}"] for rec in engine.records if f"r{i}" in rec.logits]
        assert len(steps) == NEW_TOKENS
        torch.testing.assert_close(torch.stack(steps), torch.cat(out.logits), atol=ATOL, rtol=0)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_single_file_and_sharded_checkpoints_load_the_same(tmp_path: Path):
    build("qwen2_moe", tmp_path / "one")
    build("qwen2_moe", tmp_path / "many", shard=True)
    assert (tmp_path / "one" / "model.safetensors").is_file()
    cfg = read_config(tmp_path / "one")
    assert cfg == read_config(tmp_path / "many")
    a, b = load_state_dict(tmp_path / "one", cfg), load_state_dict(tmp_path / "many", cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["layers.0.moe.w_gate"].shape == (8, 32, 64)  # experts stacked [E, f, d]


def test_config_translation(tmp_path: Path):
    cfgs = {mt: read_config(build(mt, tmp_path / mt)[1]) for mt in TYPES}
    assert cfgs["mixtral"].routing.renormalize and cfgs["mixtral"].bos_token_id == BOS
    assert not cfgs["olmoe"].routing.renormalize and cfgs["olmoe"].qk_norm == "full"
    assert cfgs["qwen2_moe"].moe_layers == (0, 2) and cfgs["qwen2_moe"].shared_expert_gate
    assert cfgs["qwen2_moe"].attention_bias and not cfgs["qwen2_moe"].attention_output_bias
    assert cfgs["qwen3_moe"].qk_norm == "head" and cfgs["qwen3_moe"].moe_layers == (1, 2)
    assert all(c.eos_token_id == EOS and c.tokenizer == "huggingface" for c in cfgs.values())
    assert {c.bos_token_id for mt, c in cfgs.items() if mt != "mixtral"} == {None}


def test_text_prompts_encode_as_the_hf_tokenizer_does(tmp_path: Path):
    _, model_dir = build("mixtral", tmp_path / "m")
    engine = Engine(model_dir, ENGINE)
    text = "Expert choice, héllo"
    assert engine.encode(text) == byte_tokenizer(add_bos=True).encode(text).ids
    assert engine.encode(text)[0] == BOS


def test_expert_choice_as_an_explicit_experiment(tmp_path: Path):
    _, model_dir = build("mixtral", tmp_path / "m")
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    data["ecserve_routing"] = {"policy": "ec", "capacity_factor": 2.0, "group_size": 16}
    path.write_text(json.dumps(data))
    engine = Engine(model_dir, ENGINE)
    assert engine.model_cfg.routing.policy == "ec"
    out = _run(engine, [Request("a", (BOS, 1, 2, 3), SamplingParams(max_new_tokens=4))])
    assert len(out["a"]) == 4


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("model_type,changes,message", [
    ("mixtral", {"model_type": "llama"}, r"model_type='llama' is not supported \(supported: "
     r"ecserve, mixtral, olmoe, qwen2_moe, qwen3_moe\)"),
    ("mixtral", {"sliding_window": 128},
     r"sliding_window=128 is smaller than max_position_embeddings=256"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 64}, r"sliding_window=64"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     r"rope_parameters.rope_type='yarn' is not supported"),
    ("qwen2_moe", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling=.*linear.* is not supported"),
    ("olmoe", {"clip_qkv": 8.0}, r"clip_qkv=8.0 is not supported"),
    ("mixtral", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
    ("qwen3_moe", {"ecserve_routing": {"policy": "ec", "bogus": 1}},
     r"ecserve_routing: unknown key\(s\) ecserve_routing.bogus"),
])
def test_unsupported_options_are_named(tmp_path: Path, model_type, changes, message):
    _, model_dir = build(model_type, tmp_path / "m")
    _edit_config(model_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        read_config(model_dir)


def test_missing_and_unexpected_tensors_are_named_by_their_hf_names(tmp_path: Path):
    _, model_dir = build("qwen2_moe", tmp_path / "m")
    _edit_config(model_dir, qkv_bias=False)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) for qwen2_moe.*"
                       r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_state_dict(model_dir, read_config(model_dir))
    _edit_config(model_dir, qkv_bias=True, num_experts=9)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): "
                       r"model\.layers\.0\.mlp\.experts\.8\.down_proj\.weight"):
        load_state_dict(model_dir, read_config(model_dir))
