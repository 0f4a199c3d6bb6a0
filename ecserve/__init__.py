"""ecserve: an inference serving engine for expert-choice Mixture-of-Experts language models."""

from ecserve.config import ConfigError, EngineConfig, ModelConfig, RoutingConfig
from ecserve.engine.llm import LLM, GenerationOutput
from ecserve.types import FinishReason, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ConfigError",
    "EngineConfig",
    "FinishReason",
    "GenerationOutput",
    "ModelConfig",
    "RoutingConfig",
    "SamplingParams",
    "__version__",
]
