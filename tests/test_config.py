"""ModelConfig / RoutingConfig / EngineConfig: defaults, capacity arithmetic, and errors that
name the offending key (as a dotted path when nested) and what is wrong with it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import tiny_config

from ecserve.config import ConfigError, EngineConfig, ModelConfig, RoutingConfig, parse_dataclass

REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
            "num_experts", "expert_ffn_hidden_size")


def parse(**overrides) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config(**overrides))


def minimal(**extra) -> dict:
    """Only the required keys (from the tiny config), plus `extra`."""
    base = tiny_config()
    return {k: base[k] for k in REQUIRED} | extra


def test_config_error_is_a_value_error():
    # The CLI reports ValueErrors as usage errors (exit 2); ConfigError must be one.
    assert issubclass(ConfigError, ValueError)


def test_tiny_config_parses():
    cfg = parse()
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert cfg.routing == RoutingConfig(policy="capped", capacity_factor=2.0, group_size=8)


# ---------------------------------------------------------------- unknown / missing keys


def test_unknown_top_level_keys_are_all_named():
    with pytest.raises(ConfigError, match=r"^config: unknown key\(s\) hidden_dim, layers$"):
        parse(layers=4, hidden_dim=64)


def test_unknown_nested_key_names_its_section():
    with pytest.raises(ConfigError) as err:
        parse(routing={"foo": 1})
    msg = str(err.value)
    # "routing: unknown key(s) foo" or "routing.foo ..." -- the section and the key, together
    assert msg == "routing: unknown key(s) routing.foo"


def test_missing_required_keys_are_all_listed_in_order():
    with pytest.raises(ConfigError, match=rf"^config: missing key\(s\) {', '.join(REQUIRED)}$"):
        ModelConfig.from_dict({})


def test_missing_one_required_key():
    data = minimal()
    del data["num_experts"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) num_experts$"):
        ModelConfig.from_dict(data)


def test_unknown_is_reported_before_missing():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) bogus"):
        ModelConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("overrides,message", [
    ({"hidden_size": "64"}, "hidden_size: expected int, got str '64'"),
    ({"hidden_size": 64.0}, "hidden_size: expected int, got float 64.0"),
    ({"num_layers": True}, "num_layers: expected int, got bool True"),
    ({"vocab_size": None}, "vocab_size: expected int, got NoneType None"),
    ({"router_bias": 1}, "router_bias: expected bool, got int 1"),
    ({"activation": 1}, "activation: expected str, got int 1"),
    ({"norm_eps": "1e-6"}, "norm_eps: expected float, got str '1e-6'"),
    ({"norm_eps": False}, "norm_eps: expected float, got bool False"),
    ({"moe_layers": 1}, "moe_layers: expected a list, got int"),
    ({"moe_layers": [1, "3"]}, "moe_layers[1]: expected int, got str '3'"),
    ({"routing": {"capacity_factor": "2"}}, "routing.capacity_factor: expected float, got str"),
    ({"routing": {"group_size": True}}, "routing.group_size: expected int, got bool True"),
    ({"routing": {"scope": None}}, "routing.scope: expected str, got NoneType None"),
    ({"routing": {"renormalize": "yes"}}, "routing.renormalize: expected bool, got str 'yes'"),
    ({"routing": {"max_experts_per_token": 1.5}},
     "routing.max_experts_per_token: expected int, got float 1.5"),
])
def test_wrong_types_name_the_key_and_the_types(overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        parse(**overrides)


@pytest.mark.parametrize("routing,kind", [([1, 2], "list"), (None, "NoneType"), (2.0, "float")])
def test_routing_must_be_an_object(routing, kind):
    with pytest.raises(ConfigError, match=rf"^routing: expected an object, got {kind}$"):
        ModelConfig.from_dict(minimal(routing=routing))


def test_top_level_must_be_an_object():
    with pytest.raises(ConfigError, match=r"^config: expected an object, got list$"):
        ModelConfig.from_dict([])  # type: ignore[arg-type]


def test_optional_keys_accept_null_and_ints_widen_to_float():
    cfg = parse(num_kv_heads=None, head_dim=None, eos_token_id=None,
                routing={"max_experts_per_token": None, "capacity_factor": 1})
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16 and cfg.eos_token_id is None
    assert cfg.routing.max_experts_per_token is None
    assert cfg.routing.capacity_factor == 1.0 and isinstance(cfg.routing.capacity_factor, float)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("overrides,pattern", [
    ({"num_heads": 4, "num_kv_heads": 3}, r"^num_heads=4 must be a multiple of num_kv_heads=3$"),
    ({"num_heads": 2, "num_kv_heads": 4}, r"^num_heads=2 must be a multiple of num_kv_heads=4$"),
    ({"moe_layers": [1, 4, -1]}, r"^moe_layers: \[4, -1\] outside \[0, num_layers=4\)$"),
    ({"moe_layers": [1, 3, 1]}, r"^moe_layers has duplicates: \[1, 3, 1\]$"),
    ({"hidden_size": 0}, r"^hidden_size must be > 0, got 0$"),
    ({"num_kv_heads": 0}, r"^num_kv_heads must be > 0, got 0$"),
    ({"max_position_embeddings": -1}, r"^max_position_embeddings must be > 0, got -1$"),
    ({"shared_expert_ffn_hidden_size": -1}, r"^shared_expert_ffn_hidden_size must be >= 0"),
    ({"model_type": "llama"},
     r"^model_type: 'llama' is not one of ecserve, mixtral, olmoe, qwen2_moe, qwen3_moe$"),
    ({"qk_norm": "layer"}, r"^qk_norm: 'layer' is not one of none, full, head$"),
    ({"shared_expert_gate": True}, r"^shared_expert_gate needs a shared expert"),
    ({"activation": "relu"}, r"^activation: 'relu' is not one of silu, gelu$"),
    ({"position_encoding": "alibi"},
     r"^position_encoding: 'alibi' is not one of rope, relative_bias$"),
    ({"dtype": "float64"}, r"^dtype: 'float64' is not one of float32, bfloat16, float16$"),
    ({"tokenizer": "sentencepiece"}, r"^tokenizer: 'sentencepiece' is not one of byte, "),
    ({"eos_token_id": 258}, r"^eos_token_id=258 outside the vocabulary \[0, 258\)$"),
    ({"eos_token_id": -1}, r"^eos_token_id=-1 outside the vocabulary \[0, 258\)$"),
    ({"bos_token_id": 300}, r"^bos_token_id=300 outside the vocabulary \[0, 258\)$"),
    ({"head_dim": 15}, r"^head_dim must be even for rope, got 15$"),
    ({"norm_eps": 0}, r"^norm_eps must be > 0, got 0\.0$"),
    ({"norm_eps": -1e-6}, r"^norm_eps must be > 0"),
    ({"rope_theta": 0}, r"^rope_theta must be > 0"),
    ({"relative_attention_num_buckets": 0}, r"^relative_attention_num_buckets must be > 0"),
])
def test_bad_model_values(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse(**overrides)


@pytest.mark.parametrize("routing,pattern", [
    ({"capacity_factor": 0}, r"^routing\.capacity_factor must be > 0, got 0\.0$"),
    ({"capacity_factor": -0.5}, r"^routing\.capacity_factor must be > 0, got -0\.5$"),
    ({"capacity_factor": float("inf")}, r"^routing\.capacity_factor must be > 0, got inf$"),
    ({"max_experts_per_token": 5},
     r"^routing\.max_experts_per_token must be in \[1, num_experts=4\], got 5$"),
    ({"max_experts_per_token": 0},
     r"^routing\.max_experts_per_token must be in \[1, num_experts=4\], got 0$"),
    ({"top_k": 0}, r"^routing\.top_k must be in \[1, num_experts=4\], got 0$"),
    ({"policy": "token_choice", "top_k": 5},
     r"^routing\.top_k must be in \[1, num_experts=4\], got 5$"),
    ({"group_size": 0}, r"^routing\.group_size must be > 0, got 0$"),
    ({"policy": "ec", "group_size": 9}, r"^routing\.group_size=9 must be a multiple of 2 "),
    ({"policy": "capped", "group_size": 9}, r"^routing\.group_size=9 must be a multiple of 2 "),
    # c=0.3, E=4: n*c/E is first whole at n=40
    ({"capacity_factor": 0.3, "group_size": 20},
     r"^routing\.group_size=20 must be a multiple of 40 \(.*c=0\.3, E=4\)$"),
    ({"policy": "switch"},
     r"^routing\.policy: 'switch' is not one of ec, capped, threshold, token_choice$"),
    ({"scope": "global"}, r"^routing\.scope: 'global' is not one of batch, sequence$"),
])
def test_bad_routing_values_use_dotted_paths(routing, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse(routing=routing)


def test_threshold_policy_takes_b_and_any_group_size():
    r = parse(routing={"policy": "threshold", "max_experts_per_token": 2, "group_size": 9}).routing
    assert (r.policy, r.max_experts_per_token, r.group_size) == ("threshold", 2, 9)
    with pytest.raises(ConfigError, match=r"^routing\.max_experts_per_token must be in"):
        parse(routing={"policy": "threshold", "max_experts_per_token": 5})


def test_engine_routing_overrides_are_checked():
    assert EngineConfig(routing_policy="threshold", max_experts_per_token=2).routing_policy == (
        "threshold")
    with pytest.raises(ConfigError, match="routing_policy: 'switch' is not one of ec, capped"):
        EngineConfig(routing_policy="switch")
    for name in ("max_experts_per_token", "max_prefill_chunk"):
        with pytest.raises(ConfigError, match=f"{name} must be > 0, got 0"):
            EngineConfig(**{name: 0})


def test_group_size_unit_only_binds_expert_choice_policies():
    assert parse(routing={"policy": "token_choice", "group_size": 9}).routing.group_size == 9
    assert parse(routing={"policy": "ec", "group_size": 10}).routing.group_size == 10
    assert parse(routing={"capacity_factor": 0.3, "group_size": 80}).routing.group_size == 80


def test_values_that_are_allowed():
    # odd head_dim is only a rope constraint
    assert parse(position_encoding="relative_bias", head_dim=15).head_dim == 15
    assert parse(moe_layers=[]).moe_layers == ()
    assert parse(moe_layers=[3, 0]).moe_layers == (3, 0)
    assert parse(eos_token_id=0, bos_token_id=257).eos_token_id == 0
    assert parse(routing={"max_experts_per_token": 4, "top_k": 4}).routing.top_k == 4


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"^routing\.top_k must be in"):
        ModelConfig(**{**minimal(), "routing": RoutingConfig(policy="token_choice", top_k=9)})
    with pytest.raises(ConfigError, match=r"^num_heads=4 must be a multiple of num_kv_heads=3$"):
        ModelConfig(**minimal(), num_kv_heads=3)


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("num_layers,moe", [
    (1, ()), (2, (1,)), (4, (1, 3)), (6, (1, 3, 5)), (7, (1, 3, 5)),
])
def test_moe_layers_default_to_every_other_block(num_layers, moe):
    assert ModelConfig.from_dict(minimal(num_layers=num_layers)).moe_layers == moe


def test_head_defaults():
    cfg = ModelConfig.from_dict(minimal(hidden_size=96, num_heads=6))
    assert cfg.num_kv_heads == 6 and cfg.head_dim == 16
    cfg = ModelConfig.from_dict(minimal(num_heads=4, num_kv_heads=1, head_dim=32))
    assert cfg.num_kv_heads == 1 and cfg.head_dim == 32  # explicit values are kept
    cfg = ModelConfig.from_dict(minimal())
    assert cfg.routing == RoutingConfig() and cfg.position_encoding == "rope"
    assert cfg.dtype == "float32" and cfg.tokenizer == "byte" and cfg.tie_word_embeddings


def test_model_config_roundtrips_through_json():
    cfg = parse(moe_layers=[0, 2], activation="gelu", position_encoding="relative_bias",
                shared_expert_ffn_hidden_size=32, router_bias=True, dtype="bfloat16",
                routing={"policy": "token_choice", "top_k": 3, "renormalize": True,
                         "capacity_factor": 1.25, "scope": "sequence", "group_size": 7})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["moe_layers"] == [0, 2] and data["routing"]["top_k"] == 3
    assert ModelConfig.from_dict(data) == cfg
    # the defaults filled in on parse are written out, so a second round changes nothing
    defaults = ModelConfig.from_dict(minimal())
    assert ModelConfig.from_dict(defaults.to_dict()).to_dict() == defaults.to_dict()


def test_routing_config_roundtrips():
    r = RoutingConfig(policy="ec", capacity_factor=0.75, max_experts_per_token=3, top_k=1,
                      renormalize=True, group_size=16, scope="sequence")
    assert parse_dataclass(RoutingConfig, dataclasses.asdict(r), "routing") == r


# ---------------------------------------------------------------- capacity arithmetic


@pytest.mark.parametrize("c,E,n,k", [
    (2.0, 4, 8, 4),
    (2.0, 4, 1, 1),  # ceil(0.5)
    (2.0, 4, 3, 2),  # ceil(1.5)
    (2.0, 4, 0, 0),
    (2.0, 2, 3, 3),  # n*c/E = n: every token fits
    (4.0, 2, 3, 3),  # never more slots than tokens
    (1.25, 8, 32, 5),
    (1.25, 8, 33, 6),  # ceil(5.15625)
    (0.5, 4, 8, 1),
    (0.5, 4, 9, 2),
    (0.1, 3, 30, 1),
    # exact decimals: in floats 100 * 1.1 / 10 = 11.000000000000002, whose ceil is 12
    (1.1, 10, 100, 11),
    (1.1, 2, 100, 55),  # float: 56
    (2.2, 5, 25, 11),  # float: 12
])
def test_capacity_is_min_n_ceil_n_c_over_e_exactly(c, E, n, k):
    assert RoutingConfig(capacity_factor=c).capacity(n, E) == k


@pytest.mark.parametrize("c,E,unit", [
    (2.0, 4, 2), (1.0, 3, 3), (1.25, 8, 32), (0.3, 4, 40), (3.0, 4, 4), (0.1, 3, 30),
])
def test_group_unit_is_the_smallest_whole_group(c, E, unit):
    r = RoutingConfig(capacity_factor=c)
    assert r.group_unit(E) == unit
    # a multiple of the unit fills every slot exactly; no smaller n does
    for m in (1, 2, 3):
        assert r.capacity(m * unit, E) * E == pytest.approx(m * unit * c)
    assert all(r.capacity(n, E) * E != pytest.approx(n * c) for n in range(1, unit))


def test_group_unit_when_capacity_exceeds_experts():
    assert RoutingConfig(capacity_factor=4.0).group_unit(2) == 1
    assert RoutingConfig(capacity_factor=2.5).group_unit(2) == 4  # 2.5 / 2 = 5/4


def test_experts_per_token_cap():
    assert RoutingConfig().experts_per_token_cap(8) == 8
    assert RoutingConfig(max_experts_per_token=2).experts_per_token_cap(8) == 2


# ---------------------------------------------------------------- EngineConfig


@pytest.mark.parametrize("kw,pattern", [
    ({"block_size": 0}, r"^block_size must be > 0, got 0$"),
    ({"max_num_seqs": 0}, r"^max_num_seqs must be > 0, got 0$"),
    ({"max_num_batched_tokens": -1}, r"^max_num_batched_tokens must be > 0, got -1$"),
    ({"max_model_len": 0}, r"^max_model_len must be > 0, got 0$"),
    ({"kv_cache_bytes": 0}, r"^kv_cache_bytes must be > 0, got 0$"),
    ({"max_waiting": 0}, r"^max_waiting must be > 0, got 0$"),
    ({"kv_cache_memory_fraction": 0}, r"^kv_cache_memory_fraction must be in \(0, 1\], got 0$"),
    ({"kv_cache_memory_fraction": 1.01},
     r"^kv_cache_memory_fraction must be in \(0, 1\], got 1\.01$"),
    ({"kv_cache_memory_fraction": float("nan")}, r"^kv_cache_memory_fraction must be in"),
    ({"dtype": "int8"}, r"^dtype: 'int8' is not one of float32, bfloat16, float16$"),
])
def test_engine_config_errors(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        EngineConfig(**kw)


def test_engine_config_edges_are_allowed():
    assert EngineConfig(kv_cache_memory_fraction=1.0).kv_cache_memory_fraction == 1.0
    assert EngineConfig(block_size=1, max_model_len=1, kv_cache_bytes=1, dtype="bfloat16")


def test_top_k_only_binds_token_choice():
    # With one expert, ec/capped ignore top_k, so its default (2) is no error there.
    assert parse(num_experts=1, routing={"policy": "ec", "group_size": 8}).routing.top_k == 2
    with pytest.raises(ConfigError, match=r"routing\.top_k must be in \[1, num_experts=1\]"):
        parse(num_experts=1, routing={"policy": "token_choice"})


@pytest.mark.parametrize("kw,pattern", [
    ({"device": "tpu"}, r"device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"block_size": "16"}, r"block_size must be an int, got str '16'"),
    ({"max_num_seqs": True}, r"max_num_seqs must be an int, got bool"),
])
def test_engine_config_checks_device_and_types(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        EngineConfig(**kw)
    assert EngineConfig(device="cuda:1").device == "cuda:1"
