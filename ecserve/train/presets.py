"""The models `ecserve train --preset` names: each preset's architecture and routing, as the
ModelConfig it trains with and the one its exported directory serves with.

Its own module because the recipe (what it trains) and the export (the config.json it writes)
both read it, and the recipe calls the export: kept in either, the two imported each other.
"""

from __future__ import annotations

from typing import Any

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.errors import ConfigError
from ecserve.train.options import PRESETS

# The shipped model's architecture: 6 blocks of width 256, every other one an expert-choice MoE
# layer of 8 GLU experts (hidden 512) at capacity factor 2, i.e. two experts per token on
# average, as many FLOPs as the dense blocks' GLU of hidden 1024.
ARCH: dict[str, Any] = {
    "hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
    "ffn_hidden_size": 1024, "num_experts": 8, "expert_ffn_hidden_size": 512,
}
CAPACITY_FACTOR = 2.0
# The policy a served step uses by default; training always routes with `ec` (forward.py).
# `threshold`: in bench_decode_policies.py it matched the training grouping's held-out loss at
# every load (B = 1 to 64 live sequences) with 1.75 experts per token, while `ec`/`capped` lost
# up to 3.4% at B = 4; and a request's output never depends on other traffic.
SERVING_POLICY = "threshold"


def model_config(preset: str, vocab_size: int, seq_len: int, group_size: int,
                 serving: bool = False) -> ModelConfig:
    """ec: expert choice (trained with `ec` groups; served with SERVING_POLICY); dense: the
    MoE layers replaced by dense GLUs of equal active FLOPs; top2: token-choice top-2
    (renormalised, with a load-balancing loss)."""
    if preset == "ec":
        routing = RoutingConfig(policy=SERVING_POLICY if serving else "ec",
                                capacity_factor=CAPACITY_FACTOR, group_size=group_size)
        extra: dict[str, Any] = {}
    elif preset == "top2":
        routing = RoutingConfig(policy="token_choice", top_k=2, renormalize=True,
                                capacity_factor=CAPACITY_FACTOR, group_size=group_size)
        extra = {}
    elif preset == "dense":
        routing, extra = RoutingConfig(group_size=group_size), {"moe_layers": ()}
    else:
        raise ConfigError(f"preset {preset!r} is not one of {', '.join(PRESETS)}",
                          field="preset")
    return ModelConfig(vocab_size=vocab_size, **ARCH, **extra, routing=routing,
                       max_position_embeddings=seq_len, tokenizer="huggingface",
                       bos_token_id=0, eos_token_id=1)
