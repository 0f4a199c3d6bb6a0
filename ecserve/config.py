"""Validated configuration: the model (a checkpoint's config.json), its routing, and the engine.

Every field is commented; parsing rejects unknown keys, missing keys, wrong types and bad values
with a ConfigError that names the key (as a dotted path) and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Union

POLICIES = ("ec", "capped", "threshold", "token_choice")
# Policies that route each token on its own (batch-invariant): any cut of a step into groups
# fills every slot, and the layout is dropless (as wide as the busiest expert).
PER_TOKEN_POLICIES = ("threshold", "token_choice")
SCOPES = ("batch", "sequence")
ACTIVATIONS = ("silu", "gelu")
POSITION_ENCODINGS = ("rope", "relative_bias")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZERS = ("byte", "huggingface")
# ecserve's own checkpoint format, then the Hugging Face MoE types loaded in place (their own
# config.json and tensor names, mapped by ecserve/model/hf/).
MODEL_TYPES = ("ecserve", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
QK_NORMS = ("none", "full", "head")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names it."""


def exact_fraction(x: float) -> Fraction:
    """The decimal a user wrote (1.25, 0.1), exactly: ceil(n * c / E) then has no float error."""
    return Fraction(repr(float(x)))


@dataclass(frozen=True)
class RoutingConfig:
    """How MoE layers assign tokens to experts (shared/spec/routing.md)."""

    # ec | capped | threshold | token_choice (shared/spec/routing.md section 3). `threshold`
    # needs the per-expert thresholds the checkpoint stores (layers.N.moe.threshold).
    policy: str = "capped"
    # c: expert slots per token on average; each expert takes k(n) = min(n, ceil(n*c/E)) tokens.
    capacity_factor: float = 2.0
    # b, the most experts one token may take under `capped` and `threshold`; None means E.
    max_experts_per_token: int | None = None
    # K, the experts each token picks under `token_choice`.
    top_k: int = 2
    # token_choice only: rescale a token's K gates to sum to 1 (Mixtral) or keep the raw softmax.
    renormalize: bool = False
    # Target tokens per routing group. For ec/capped it must be a multiple of the smallest group
    # size whose n*c/E is whole, so that full groups use every capacity slot.
    group_size: int = 64
    # Default routing scope for requests that do not choose one: batch | sequence.
    scope: str = "batch"

    def validate(self, num_experts: int, path: str = "routing") -> None:
        _check_choice(f"{path}.policy", self.policy, POLICIES)
        _check_choice(f"{path}.scope", self.scope, SCOPES)
        if not self.capacity_factor > 0 or not math.isfinite(self.capacity_factor):
            raise ConfigError(f"{path}.capacity_factor must be > 0, got {self.capacity_factor}")
        _check_positive(f"{path}.group_size", self.group_size)
        b = self.max_experts_per_token
        if b is not None and not 1 <= b <= num_experts:
            raise ConfigError(
                f"{path}.max_experts_per_token must be in [1, num_experts={num_experts}], got {b}"
            )
        if self.top_k < 1 or (self.policy == "token_choice" and self.top_k > num_experts):
            raise ConfigError(
                f"{path}.top_k must be in [1, num_experts={num_experts}], got {self.top_k}"
            )
        unit = self.group_unit(num_experts)
        if self.policy not in PER_TOKEN_POLICIES and self.group_size % unit:
            raise ConfigError(
                f"{path}.group_size={self.group_size} must be a multiple of {unit} (the smallest "
                f"group whose n*c/E is whole for c={self.capacity_factor}, E={num_experts})"
            )

    def group_unit(self, num_experts: int) -> int:
        """Smallest n > 0 with n * c / E whole: groups sized in multiples of it fill every slot."""
        ratio = exact_fraction(self.capacity_factor) / num_experts
        return ratio.denominator

    def capacity(self, n: int, num_experts: int) -> int:
        """k(n) = min(n, ceil(n * c / E)): the slots each expert has in a group of n tokens."""
        return min(n, math.ceil(n * exact_fraction(self.capacity_factor) / num_experts))

    def experts_per_token_cap(self, num_experts: int) -> int:
        return num_experts if self.max_experts_per_token is None else self.max_experts_per_token


@dataclass(frozen=True)
class ModelConfig:
    """The model architecture, read from a checkpoint directory's config.json."""

    vocab_size: int  # rows of the embedding and of the output head
    hidden_size: int  # d, the residual stream width
    num_layers: int  # transformer blocks
    num_heads: int  # query heads
    ffn_hidden_size: int  # hidden width of the dense GLU feed-forward layers
    num_experts: int  # E, experts in every MoE layer
    expert_ffn_hidden_size: int  # hidden width of each expert's GLU
    # ecserve | mixtral | olmoe | qwen2_moe | qwen3_moe: the tensor names (README, "Hugging Face
    # MoE checkpoints"); an HF directory's config.json is translated, not parsed as is.
    model_type: str = "ecserve"
    num_kv_heads: int | None = None  # key/value heads (GQA); None means num_heads (MHA)
    head_dim: int | None = None  # per-head width; None means hidden_size // num_heads
    # Which blocks have an MoE layer instead of a dense FFN; None means every other block
    # (1, 3, 5, ...), as in the paper.
    moe_layers: tuple[int, ...] | None = None
    shared_expert_ffn_hidden_size: int = 0  # width of a shared expert every token uses; 0: none
    # The shared expert's output is scaled by sigmoid(x @ w) per token (Qwen2-MoE), w: [1, d].
    shared_expert_gate: bool = False
    attention_bias: bool = False  # the q, k and v projections have biases (Qwen2-MoE)
    attention_output_bias: bool = False  # the output projection has a bias
    # RMSNorm on q and k before rope: none | full (over all heads at once, OLMoE) | head (per
    # head, Qwen3-MoE)
    qk_norm: str = "none"
    activation: str = "silu"  # GLU activation: silu (SwiGLU) | gelu (GeGLU, tanh approximation)
    router_bias: bool = False  # the router has a bias vector
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    position_encoding: str = "rope"  # rope | relative_bias (per-layer T5-style, as in the paper)
    rope_theta: float = 10000.0  # rope base
    relative_attention_num_buckets: int = 32  # relative_bias: distance buckets
    relative_attention_max_distance: int = 128  # relative_bias: distances past this share a bucket
    max_position_embeddings: int = 2048  # the longest sequence (prompt + output) the model takes
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = True  # the output head reuses the embedding matrix
    dtype: str = "float32"  # weights and activations: float32 | bfloat16 | float16
    tokenizer: str = "byte"  # byte (built in) | huggingface (tokenizer.json in the directory)
    bos_token_id: int | None = None  # prepended to prompts when set
    eos_token_id: int | None = None  # ends generation when sampled (unless ignored)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.moe_layers is None:
            object.__setattr__(self, "moe_layers", tuple(range(1, self.num_layers, 2)))
        self.validate()

    def validate(self) -> None:
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size", "num_experts", "expert_ffn_hidden_size",
                     "max_position_embeddings"):
            _check_positive(name, getattr(self, name))
        assert self.num_kv_heads is not None and self.moe_layers is not None
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.shared_expert_ffn_hidden_size < 0:
            raise ConfigError("shared_expert_ffn_hidden_size must be >= 0 (0: no shared expert)")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ConfigError("shared_expert_gate needs a shared expert "
                              "(shared_expert_ffn_hidden_size > 0)")
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers: {bad} outside [0, num_layers={self.num_layers})")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ConfigError(f"moe_layers has duplicates: {list(self.moe_layers)}")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("position_encoding", self.position_encoding, POSITION_ENCODINGS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rope, got {self.head_dim}")
        _check_positive("relative_attention_num_buckets", self.relative_attention_num_buckets)
        _check_positive("relative_attention_max_distance", self.relative_attention_max_distance)
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{name}={tid} outside the vocabulary [0, {self.vocab_size})")
        self.routing.validate(self.num_experts)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return parse_dataclass(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["moe_layers"] = list(self.moe_layers or ())
        return out


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, KV cache budget and per-step limits."""

    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    dtype: str | None = None  # override the checkpoint's dtype (e.g. float32 on CPU); None: keep
    block_size: int = 16  # tokens per KV cache block
    max_num_seqs: int = 64  # most requests running at once
    max_num_batched_tokens: int = 512  # most tokens (decode + prefill chunks) in one step
    max_model_len: int | None = None  # longest prompt + output; None: the model's maximum
    # KV cache size in bytes; None: kv_cache_memory_fraction of the device's free memory after
    # the weights. Never more than max_num_seqs full-length sequences need.
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_waiting: int = 1024  # most requests queued for admission; more are refused
    max_waiting_tokens: int = 262144  # most prompt tokens queued for admission; more are refused
    # Most prompt tokens of one sequence in one step; None: what the step's budget allows. 1
    # scores a prompt as decode steps would (one token per sequence per step).
    max_prefill_chunk: int | None = None
    # Serve with another routing policy than the checkpoint's (ec | capped | threshold |
    # token_choice) and another per-token expert cap b; None: the checkpoint's.
    routing_policy: str | None = None
    max_experts_per_token: int | None = None
    record_steps: bool = False  # debug: keep every step's routing groups and sampled logits
    # Every Nth step, time each expert's work alone for the per-expert latency metric (a
    # measurement pass beside the real computation: about 1/N of the MoE layers' time); 0: off.
    expert_timing_every: int = 64
    # torch (plain PyTorch) | triton (ecserve_kernels: fused expert MLP, paged decode attention)
    # | auto (triton on CUDA devices, torch elsewhere)
    kernels: str = "auto"
    # On CUDA with the Triton kernels: capture pure decode steps of up to cuda_graph_max_batch
    # sequences (None: max_num_seqs) as CUDA graphs and replay them, one graph per routing-group
    # layout, at most cuda_graph_limit graphs. The default scope's layouts are captured at start.
    cuda_graphs: bool = True
    cuda_graph_max_batch: int | None = None
    cuda_graph_limit: int = 256

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("kernels", self.kernels, ("auto", "torch", "triton"))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting",
                     "max_waiting_tokens", "cuda_graph_limit"):
            _check_positive(name, getattr(self, name))
        if self.routing_policy is not None:
            _check_choice("routing_policy", self.routing_policy, POLICIES)
        for name in ("max_model_len", "cuda_graph_max_batch", "max_prefill_chunk",
                     "max_experts_per_token"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not isinstance(self.expert_timing_every, int) or self.expert_timing_every < 0:
            raise ConfigError(f"expert_timing_every must be an int >= 0, got "
                              f"{self.expert_timing_every!r}")
        if self.kv_cache_bytes is not None:
            _check_positive("kv_cache_bytes", self.kv_cache_bytes)
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server: where it listens, how it drains, and the limits on what a request asks."""

    host: str = "127.0.0.1"  # listen address; 0.0.0.0 (or [::]) to take outside connections
    port: int = 50051  # 0: any free port
    reuse_port: bool = False  # SO_REUSEPORT: let several servers share the port on purpose
    grace_period: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    # seconds after SIGTERM with health NOT_SERVING but new calls still taken, so balancers
    # stop sending before the port closes (a Kubernetes preStop pause does the same)
    drain_delay: float = 0.0
    # seconds before a connection is sent GOAWAY (clients reconnect, and may land on another
    # replica); None: never. Its grace: how long calls on it may still run; None: no limit.
    max_connection_age: float | None = None
    max_connection_age_grace: float | None = None
    max_request_bytes: int = 1 << 20  # larger requests: INVALID_ARGUMENT (4x: refused by gRPC)
    default_max_new_tokens: int = 16  # when a request does not say
    max_stop_sequences: int = 8
    max_stop_sequence_length: int = 256  # characters
    max_top_logprobs: int = 20
    warmup: bool = True  # run a short generation before reporting SERVING
    metrics: bool = True  # serve Prometheus metrics over HTTP at /metrics
    metrics_host: str | None = None  # None: the same address as gRPC
    metrics_port: int = 9400  # 0: any free port
    expert_metrics: str = "full"  # per-expert series: full (each) | aggregate (per layer) | off
    tls_cert_file: str | None = None  # PEM certificate chain: serve gRPC over TLS
    tls_key_file: str | None = None  # its PEM private key
    tls_client_ca_file: str | None = None  # mutual TLS: clients need a certificate from this CA
    api_key_file: str | None = None  # keys (one per line) a call must bear; None: no key asked
    # Services answering without a key when api_key_file is set: health | reflection
    open_services: tuple[str, ...] = ("health",)

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs a certificate and its key: give both tls_cert_file "
                              "and tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_client_ca_file (mutual TLS) needs TLS: give tls_cert_file "
                              "and tls_key_file too")
        for name in self.open_services:
            _check_choice("open_services", name, ("health", "reflection"))
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        _check_choice("expert_metrics", self.expert_metrics, ("full", "aggregate", "off"))
        for name in ("grace_period", "drain_delay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("max_connection_age", "max_connection_age_grace"):
            if (v := getattr(self, name)) is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {v}")
        if self.max_connection_age_grace is not None and self.max_connection_age is None:
            raise ConfigError("max_connection_age_grace needs max_connection_age")
        for name in ("max_request_bytes", "default_max_new_tokens", "max_stop_sequences",
                     "max_stop_sequence_length"):
            _check_positive(name, getattr(self, name))
        if self.max_top_logprobs < 0:
            raise ConfigError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")


# ---------------------------------------------------------------- parsing helpers


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from JSON data, naming the dotted key of anything wrong."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{path}.{k}") if path else (lambda k: k)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(dotted, unknown))}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(map(dotted, missing))}")
    kwargs = {k: _parse_value(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:  # every union in these configs is `X | None`
            return None
        (inner,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return _parse_value(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        item = typing.get_args(tp)[0]
        return tuple(_parse_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} at {path}")
    if not ok:
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value
