"""Config parsing: defaults, and errors that name the key and the problem."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from ecserve.config import ConfigError, EngineConfig, ModelConfig, RoutingConfig


def parse(**overrides) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config(**overrides))


def test_defaults_and_roundtrip():
    cfg = parse(num_kv_heads=None, head_dim=None)
    assert cfg.moe_layers == (1, 3) and cfg.num_kv_heads == 4 and cfg.head_dim == 16
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert parse(num_layers=7).moe_layers == (1, 3, 5)


@pytest.mark.parametrize("data,match", [
    ({"foo": 1}, r"config: unknown key\(s\) foo"),
    ({"routing": {"foo": 1}}, r"routing: unknown key\(s\) foo"),
    ({"hidden_size": "64"}, r"hidden_size: expected int, got str '64'"),
    ({"num_layers": True}, r"num_layers: expected int, got bool"),
    ({"routing": {"capacity_factor": "2"}}, r"routing.capacity_factor: expected float"),
    ({"moe_layers": 1}, r"moe_layers: expected a list"),
    ({"moe_layers": [1, "x"]}, r"moe_layers\[1\]: expected int"),
    ({"vocab_size": None}, r"vocab_size: expected int, got NoneType"),
    ({"num_heads": 4, "num_kv_heads": 3}, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ({"moe_layers": [1, 9]}, r"moe_layers: \[9\] outside \[0, num_layers=4\)"),
    ({"moe_layers": [1, 1]}, r"moe_layers has duplicates"),
    ({"routing": {"capacity_factor": 0}}, r"routing.capacity_factor must be > 0"),
    ({"routing": {"max_experts_per_token": 5}}, r"routing.max_experts_per_token must be in \[1"),
    ({"routing": {"top_k": 0}}, r"routing.top_k must be in \[1, num_experts=4\]"),
    ({"routing": {"group_size": 9}}, r"routing.group_size=9 must be a multiple of 2"),
    ({"routing": {"policy": "threshold"}}, r"'threshold' is not supported yet"),
    ({"routing": {"policy": "switch"}}, r"routing.policy: 'switch' is not one of"),
    ({"routing": {"scope": "global"}}, r"routing.scope: 'global' is not one of"),
    ({"activation": "relu"}, r"activation: 'relu' is not one of silu, gelu"),
    ({"position_encoding": "alibi"}, r"position_encoding: 'alibi' is not one of"),
    ({"dtype": "float8"}, r"dtype: 'float8' is not one of"),
    ({"tokenizer": "sentencepiece"}, r"tokenizer: 'sentencepiece' is not one of"),
    ({"eos_token_id": 258}, r"eos_token_id=258 outside the vocabulary \[0, 258\)"),
    ({"head_dim": 15}, r"head_dim must be even for rope, got 15"),
    ({"norm_eps": 0}, r"norm_eps must be > 0"),
    ({"model_type": "mixtral"}, r"model_type must be 'ecserve'"),
    ({"hidden_size": 0}, r"hidden_size must be > 0, got 0"),
])
def test_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        parse(**data)


def test_missing_keys_are_all_listed():
    data = tiny_config()
    del data["vocab_size"], data["num_experts"]
    with pytest.raises(ConfigError, match=r"config: missing key\(s\) vocab_size, num_experts"):
        ModelConfig.from_dict(data)


def test_group_size_rule_is_only_for_expert_choice_policies():
    cfg = parse(routing={"policy": "token_choice", "group_size": 9})
    assert cfg.routing.group_size == 9


def test_capacity_is_exact_for_decimal_factors():
    r = RoutingConfig(capacity_factor=1.25, group_size=32)
    assert [r.capacity(n, 8) for n in (1, 7, 32, 33)] == [1, 2, 5, 6]
    assert r.group_unit(8) == 32  # 32 * 1.25 / 8 = 5 is the first whole value
    assert RoutingConfig(capacity_factor=0.1).capacity(30, 3) == 1  # not 2 from float error
    assert RoutingConfig(capacity_factor=2.0).capacity(3, 2) == 3  # never more than n


@pytest.mark.parametrize("kw,match", [
    ({"block_size": 0}, "block_size must be > 0"),
    ({"kv_cache_memory_fraction": 0}, r"kv_cache_memory_fraction must be in \(0, 1\]"),
    ({"kv_cache_memory_fraction": 1.5}, r"kv_cache_memory_fraction must be in \(0, 1\]"),
    ({"dtype": "int8"}, "dtype: 'int8' is not one of"),
    ({"max_waiting": 0}, "max_waiting must be > 0"),
])
def test_engine_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kw)
