"""ecserve: an inference serving engine for expert-choice Mixture-of-Experts language models."""

from __future__ import annotations

import importlib
from typing import Any

from ecserve import openmp

openmp.passive_unless_given()  # before anything imports torch

__version__ = "0.1.0"

# Imported on first use, so `ecserve health` and the client do not pay for torch.
_EXPORTS = {
    "LLM": "ecserve.engine.llm",
    "GenerationOutput": "ecserve.engine.llm",
    "ConfigError": "ecserve.config",
    "EngineConfig": "ecserve.config",
    "ModelConfig": "ecserve.config",
    "RoutingConfig": "ecserve.config",
    "ServerConfig": "ecserve.config",
    "FinishReason": "ecserve.types",
    "SamplingParams": "ecserve.types",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecserve' has no attribute {name!r}")
