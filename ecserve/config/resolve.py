"""The rules that join several settings, in one place: an engine's configuration against the
model it loads. Each rule raises a ConfigError naming the field to change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ecserve.config.engine import EngineConfig
from ecserve.config.model import Dtype, ModelConfig
from ecserve.errors import ConfigError


@dataclass(frozen=True)
class ResolvedEngine:
    """An engine configuration checked against its model, with every default filled in."""

    model: ModelConfig  # the checkpoint's, with the engine's routing overrides applied
    engine: EngineConfig
    max_model_len: int  # engine.max_model_len, or the model's max_position_embeddings
    dtype: Dtype  # engine.dtype, or the checkpoint's


def resolve_engine(model: ModelConfig, engine: EngineConfig) -> ResolvedEngine:
    """`engine` applied to `model` (a routing policy or expert cap served instead of the
    checkpoint's), checked: ConfigError naming the field otherwise."""
    overrides = {k: v for k, v in (("policy", engine.routing_policy),
                                   ("max_experts_per_token", engine.max_experts_per_token))
                 if v is not None}
    if overrides:
        # RoutingConfig.validate (run by ModelConfig) checks the overrides against the model.
        model = dataclasses.replace(model, routing=dataclasses.replace(model.routing,
                                                                       **overrides))
    max_model_len = engine.max_model_len or model.max_position_embeddings
    if max_model_len > model.max_position_embeddings:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's "
                          f"max_position_embeddings={model.max_position_embeddings}",
                          field="max_model_len")
    if engine.max_num_batched_tokens < max(engine.max_num_seqs, model.routing.group_size):
        raise ConfigError(
            f"max_num_batched_tokens={engine.max_num_batched_tokens} must be >= max_num_seqs="
            f"{engine.max_num_seqs} and >= routing.group_size={model.routing.group_size}",
            field="max_num_batched_tokens")
    return ResolvedEngine(model, engine, max_model_len, engine.dtype or model.dtype)
