"""Validated configuration: the model (a checkpoint's config.json) and its routing, the
engine, the server, and how `ecserve serve` runs. Every field is documented by the string
under it; the command line's flags are generated from these dataclasses (docs/cli.md)."""

from ecserve.config.engine import EngineConfig
from ecserve.config.launch import MODEL_ENV, LaunchConfig, ModelSource
from ecserve.config.model import (
    DTYPES,
    MODEL_TYPES,
    PER_TOKEN_POLICIES,
    POLICIES,
    SCOPES,
    Dtype,
    ModelConfig,
    ModelType,
    Policy,
    RoutingConfig,
    Scope,
    exact_fraction,
)
from ecserve.config.parse import parse_dataclass
from ecserve.config.resolve import ResolvedEngine, resolve_engine
from ecserve.config.server import EXPERT_METRICS, ExpertMetrics, ServerConfig
from ecserve.errors import ConfigError

__all__ = [
    "DTYPES", "EXPERT_METRICS", "MODEL_ENV", "MODEL_TYPES", "PER_TOKEN_POLICIES", "POLICIES",
    "SCOPES", "ConfigError", "Dtype", "EngineConfig", "ExpertMetrics", "LaunchConfig",
    "ModelConfig", "ModelSource", "ModelType", "Policy", "ResolvedEngine", "RoutingConfig",
    "Scope", "ServerConfig", "exact_fraction", "parse_dataclass", "resolve_engine",
]
