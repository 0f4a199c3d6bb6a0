"""The pipeline's nouns: what a request asks for, and what the stages hand each other.

Data flows one way: Request -> (batcher) StepPlan -> (runner) logits + StepStats ->
(sampler) token ids -> (output) TokenEvent.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    """Why a request stopped producing tokens."""

    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model's end-of-sequence token
    STOP_TOKEN = "stop_token"  # one of the request's stop_token_ids
    ABORTED = "aborted"  # cancelled by the caller


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Greedy unless temperature > 0."""

    max_new_tokens: int = 16  # most tokens to generate
    min_new_tokens: int = 0  # EOS and stop tokens are masked out until this many are generated
    temperature: float = 0.0  # 0: greedy (argmax); > 0 divides the logits before sampling
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability; 1: all
    seed: int | None = None  # per-request RNG seed; None: one is drawn and reported
    stop_token_ids: tuple[int, ...] = ()  # generation ends after any of these (it is kept)
    ignore_eos: bool = False  # keep going past the model's EOS token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One generation request, as the engine receives it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    routing_scope: str | None = None  # batch | sequence; None: the model's default


@dataclass(frozen=True)
class ScheduledChunk:
    """A run of one sequence's tokens that the model processes in this step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens fed to the model
    start_pos: int  # position of token_ids[0] in its sequence
    block_table: tuple[int, ...]  # the sequence's KV blocks, covering start_pos + len(token_ids)
    sample: bool  # the chunk reaches the newest token, so a next token is sampled from it


@dataclass(frozen=True)
class StepPlan:
    """The batcher's decision for one step: which tokens run, in what order, in which groups."""

    chunks: tuple[ScheduledChunk, ...]  # in the flat token order the model sees
    group_sizes: tuple[int, ...]  # contiguous routing groups over that order; they sum to tokens

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class MoEStats:
    """What one MoE layer's routing did in one step (counts over all its groups)."""

    layer: int  # block index
    policy: str  # routing policy in use
    group_sizes: tuple[int, ...]  # tokens per routing group
    capacity_slots: int  # slots each expert offered, summed over groups
    tokens_per_expert: torch.Tensor  # int64 [E]: slots filled by real tokens
    gate_sum: torch.Tensor  # float32 [E]: sum of the gates of those tokens
    experts_per_token: torch.Tensor  # int64 [E + 1]: histogram; [0] counts dropped tokens

    @property
    def dropped(self) -> int:
        return int(self.experts_per_token[0])


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, streamed back to the caller."""

    request_id: str
    token_id: int
    text: str  # the text this token made final (may be "" mid-character)
    index: int  # 0 for the first generated token
    finish_reason: FinishReason | None = None  # set on the request's last event

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    """What one engine step did, for metrics and debugging."""

    plan: StepPlan  # the chunks and routing groups that ran
    moe: tuple[MoEStats, ...]  # per MoE layer, in block order
    seconds: float  # wall time of the step (schedule to events)
