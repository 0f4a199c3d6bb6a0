"""Shared fixtures: tiny model directories made from config overrides."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ecserve.config import ModelConfig
from ecserve.model.default import write_model

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


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(seed=0, **overrides) -> a model directory holding a random tiny model."""
    counter = iter(range(1000))

    def make(seed: int = 0, **overrides: Any) -> Path:
        cfg = ModelConfig.from_dict(tiny_config(**overrides))
        return write_model(tmp_path / f"model{next(counter)}", cfg, seed)

    return make
