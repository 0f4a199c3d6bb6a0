"""Shared fixtures: tiny model directories made from config overrides."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without CUDA the Triton kernels run only in Triton's interpreter, which must be chosen before
# any kernel is defined: here, before a test module imports ecserve_kernels, whatever the order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines and servers started by tests decode eagerly: compiling the decode step costs seconds to
# a minute per engine. The tests of the compiled step turn it back on (test_compiled_decode.py).
os.environ.setdefault("ECSERVE_COMPILED_DECODE", "0")

from ecserve.config import ModelConfig
from ecserve.model.default import init_weights, write_model
from ecserve.model.weights import save_model

torch.set_num_threads(2)

TINY: dict[str, Any] = {
    "vocab_size": 258,
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 96,
    "num_experts": 4,
    "expert_ffn_hidden_size": 48,
    "routing": {"policy": "capped", "capacity_factor": 2.0, "group_size": 8},
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """TINY with overrides; a `routing` override is merged into TINY's routing."""
    cfg = copy.deepcopy(TINY)
    routing = overrides.pop("routing", {})
    cfg.update(overrides)
    cfg["routing"].update(routing)
    return cfg


def spread_thresholds(num_experts: int) -> torch.Tensor:
    """Per-expert thresholds around the uniform score 1/E: on a random tiny model, tokens then
    get 0, 1, 2 or more experts."""
    return torch.linspace(0.8, 1.4, num_experts) / num_experts


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(seed=0, thresholds=None, **overrides) -> a model directory holding a random
    tiny model. thresholds: True (spread_thresholds) or float32 [E] for every MoE layer; the
    default adds them when the routing policy is threshold."""
    counter = iter(range(1000))

    def make(seed: int = 0, thresholds: bool | torch.Tensor | None = None,
             **overrides: Any) -> Path:
        cfg = ModelConfig.from_dict(tiny_config(**overrides))
        path = tmp_path / f"model{next(counter)}"
        if thresholds is None:
            thresholds = cfg.routing.policy == "threshold"
        if thresholds is False:
            return write_model(path, cfg, seed)
        theta = spread_thresholds(cfg.num_experts) if thresholds is True else thresholds
        state = init_weights(cfg, seed)
        state.update({f"layers.{i}.moe.threshold": theta.clone() for i in cfg.moe_layers or ()})
        save_model(path, cfg, state)
        return path

    return make
