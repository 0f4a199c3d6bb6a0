"""The model: its architecture and routing, as a checkpoint's config.json states them.

Parsing (ModelConfig.from_dict) rejects unknown keys, missing keys, wrong types and bad values
with a ConfigError naming the key as a dotted path (docs/models.md lists the keys).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from ecserve.config.fields import check_choices, check_positive
from ecserve.config.parse import parse_dataclass
from ecserve.errors import ConfigError

Policy = Literal["ec", "capped", "threshold", "token_choice"]
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
# Policies that route each token on its own (batch-invariant): any cut of a step into groups
# fills every slot, and the layout is dropless (as wide as the busiest expert).
PER_TOKEN_POLICIES: tuple[Policy, ...] = ("threshold", "token_choice")
Scope = Literal["batch", "sequence"]
SCOPES: tuple[Scope, ...] = typing.get_args(Scope)
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = typing.get_args(Dtype)
# ecserve's own checkpoint format, then the Hugging Face MoE types loaded in place (their own
# config.json and tensor names, mapped by ecserve/model/hf/).
ModelType = Literal["ecserve", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
MODEL_TYPES: tuple[ModelType, ...] = typing.get_args(ModelType)


def exact_fraction(x: float) -> Fraction:
    """The decimal a user wrote (1.25, 0.1), exactly: ceil(n * c / E) then has no float error."""
    return Fraction(repr(float(x)))


@dataclass(frozen=True)
class RoutingConfig:
    """How MoE layers assign tokens to experts (docs/routing.md)."""

    policy: Policy = "capped"
    """ec | capped | threshold | token_choice (docs/routing.md §3). threshold needs the
    per-expert thresholds the checkpoint stores (layers.N.moe.threshold)."""
    capacity_factor: float = 2.0
    """c: expert slots per token on average; each expert takes k(n) = min(n, ceil(n*c/E)) of
    a group's n tokens."""
    max_experts_per_token: int | None = None
    """b, the most experts one token may take under capped and threshold; null means E."""
    top_k: int = 2
    """K, the experts each token picks under token_choice."""
    renormalize: bool = False
    """token_choice only: rescale a token's K gates to sum to 1 (Mixtral), or keep the raw
    softmax."""
    group_size: int = 64
    """Target tokens per routing group. For ec and capped, a multiple of the smallest group
    whose n*c/E is whole, so that full groups use every capacity slot."""
    scope: Scope = "batch"
    """The routing scope of requests that do not choose one: batch | sequence
    (docs/routing.md §5)."""

    def validate(self, num_experts: int, path: str = "routing") -> None:
        check_choices(self, path)
        if not self.capacity_factor > 0 or not math.isfinite(self.capacity_factor):
            raise ConfigError(f"{path}.capacity_factor must be > 0, got {self.capacity_factor}",
                              field=f"{path}.capacity_factor")
        check_positive(f"{path}.group_size", self.group_size)
        b = self.max_experts_per_token
        if b is not None and not 1 <= b <= num_experts:
            raise ConfigError(
                f"{path}.max_experts_per_token must be in [1, num_experts={num_experts}], got {b}",
                field=f"{path}.max_experts_per_token")
        if self.top_k < 1 or (self.policy == "token_choice" and self.top_k > num_experts):
            raise ConfigError(
                f"{path}.top_k must be in [1, num_experts={num_experts}], got {self.top_k}",
                field=f"{path}.top_k")
        unit = self.group_unit(num_experts)
        if self.policy not in PER_TOKEN_POLICIES and self.group_size % unit:
            raise ConfigError(
                f"{path}.group_size={self.group_size} must be a multiple of {unit} (the smallest "
                f"group whose n*c/E is whole for c={self.capacity_factor}, E={num_experts})",
                field=f"{path}.group_size")

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

    vocab_size: int
    """Rows of the embedding and of the output head."""
    hidden_size: int
    """d, the residual stream width."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Query heads."""
    ffn_hidden_size: int
    """Hidden width of the dense GLU feed-forward layers."""
    num_experts: int
    """E, experts in every MoE layer."""
    expert_ffn_hidden_size: int
    """Hidden width of each expert's GLU."""
    model_type: ModelType = "ecserve"
    """ecserve, or a Hugging Face type (mixtral, olmoe, qwen2_moe, qwen3_moe) whose directory
    is read in place: its config.json is translated, not parsed as is (docs/models.md)."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA when fewer than num_heads); null: num_heads."""
    head_dim: int | None = None
    """Per-head width; null: hidden_size / num_heads."""
    moe_layers: tuple[int, ...] | None = None
    """The blocks whose feed-forward is an MoE layer; null: every other block (1, 3, 5, ...),
    as in the paper."""
    shared_expert_ffn_hidden_size: int = 0
    """Width of a shared expert every token uses; 0: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x @ w) per token, w: [1, d] (Qwen2-MoE);
    needs a shared expert."""
    attention_bias: bool = False
    """Biases on the q, k and v projections (Qwen2-MoE)."""
    attention_output_bias: bool = False
    """A bias on the attention output projection."""
    qk_norm: Literal["none", "full", "head"] = "none"
    """RMSNorm on q and k before rope: none | full (over all heads at once, OLMoE) | head (per
    head, Qwen3-MoE)."""
    activation: Literal["silu", "gelu"] = "silu"
    """GLU activation: silu (SwiGLU) | gelu (GeGLU, tanh approximation)."""
    router_bias: bool = False
    """The router has a bias vector."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """How MoE layers route tokens (the routing.* keys)."""
    position_encoding: Literal["rope", "relative_bias"] = "rope"
    """rope | relative_bias (per-layer T5-style bias, as in the paper's model)."""
    rope_theta: float = 10000.0
    """The rope base."""
    relative_attention_num_buckets: int = 32
    """relative_bias: distance buckets."""
    relative_attention_max_distance: int = 128
    """relative_bias: distances past this share a bucket."""
    max_position_embeddings: int = 2048
    """The longest sequence (prompt + output) the model takes."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """The output head reuses the embedding matrix."""
    dtype: Dtype = "float32"
    """Weights and activations: float32 | bfloat16 | float16."""
    tokenizer: Literal["byte", "huggingface"] = "byte"
    """byte (built in: ids 0-255 are UTF-8 bytes, 256 <bos>, 257 <eos>) | huggingface
    (tokenizer.json in the directory)."""
    bos_token_id: int | None = None
    """Prepended to text prompts when set."""
    eos_token_id: int | None = None
    """Ends generation when sampled (unless a request ignores it)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.moe_layers is None:
            object.__setattr__(self, "moe_layers", tuple(range(1, self.num_layers, 2)))
        self.validate()

    def validate(self) -> None:
        check_choices(self)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size", "num_experts", "expert_ffn_hidden_size",
                     "max_position_embeddings"):
            check_positive(name, getattr(self, name))
        assert self.num_kv_heads is not None and self.moe_layers is not None
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads}", field="num_kv_heads")
        if self.shared_expert_ffn_hidden_size < 0:
            raise ConfigError("shared_expert_ffn_hidden_size must be >= 0 (0: no shared expert)",
                              field="shared_expert_ffn_hidden_size")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ConfigError("shared_expert_gate needs a shared expert "
                              "(shared_expert_ffn_hidden_size > 0)", field="shared_expert_gate")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers: {bad} outside [0, num_layers={self.num_layers})",
                              field="moe_layers")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ConfigError(f"moe_layers has duplicates: {list(self.moe_layers)}",
                              field="moe_layers")
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rope, got {self.head_dim}",
                              field="head_dim")
        check_positive("relative_attention_num_buckets", self.relative_attention_num_buckets)
        check_positive("relative_attention_max_distance", self.relative_attention_max_distance)
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}", field=name)
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{name}={tid} outside the vocabulary [0, {self.vocab_size})",
                                  field=name)
        self.routing.validate(self.num_experts)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return parse_dataclass(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["moe_layers"] = list(self.moe_layers or ())
        return out
