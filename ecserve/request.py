"""What a request asks for: its sampling and stopping parameters, its routing scope, and why it
finished. Light (no torch), so clients and the command line use them; ecserve.types holds the
rest of the pipeline's nouns.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ecserve.config import Scope
from ecserve.errors import RequestError


class FinishReason(str, enum.Enum):
    """Why a request stopped producing tokens."""

    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model's end-of-sequence token
    STOP_TOKEN = "stop_token"  # one of the request's stop_token_ids
    STOP_SEQUENCE = "stop_sequence"  # the text reached one of the request's stop_sequences
    TIME_LIMIT = "time_limit"  # the request's time_limit passed
    ABORTED = "aborted"  # cancelled by the caller
    ERROR = "error"  # the step running the request failed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Greedy unless temperature > 0."""

    max_new_tokens: int = 16
    """Most tokens to generate."""
    min_new_tokens: int = 0
    """EOS, stop tokens and stop sequences wait until this many tokens are generated."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0 divides the logits before sampling."""
    top_k: int = 0
    """Sample from the k most likely tokens; 0: all."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens with this much probability; 1: all."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token the output already has, in
    [-2, 2]; > 0 discourages repeating a token at all."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time the output has it, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """vLLM's (from CTRL): the logits of tokens in the prompt or the output divided by this
    when positive, multiplied when negative; > 1 discourages repetition, 1: off."""
    seed: int | None = None
    """Sampling seed, in [0, 2**63); default: one is drawn and reported, so a sampled output
    can be reproduced."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after any of these tokens (which is kept)."""
    stop_sequences: tuple[str, ...] = ()
    """Generation ends when the text contains one of these; the text ends before it (unless
    include_stop_sequence)."""
    include_stop_sequence: bool = False
    """Keep the matched stop sequence in the text."""
    ignore_eos: bool = False
    """Keep going past the model's EOS token."""
    time_limit: float | None = None
    """Seconds from arrival, after which the request stops."""
    logprobs: int | None = None
    """n >= 0: each generated token's log-probability and the n most likely others."""
    prompt_logprobs: int | None = None
    """n >= 0: each prompt token's log-probability given the tokens before it (None for the
    first) and the n most likely others, computed in the engine's prefill steps (its
    grouping)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError("max_new_tokens", f" must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise RequestError("min_new_tokens", f" must be in [0, max_new_tokens="
                               f"{self.max_new_tokens}], got {self.min_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RequestError("temperature", f" must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError("top_k", f" must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p", f" must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= (v := getattr(self, name)) <= 2:
                raise RequestError(name, f" must be in [-2, 2], got {v}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise RequestError("repetition_penalty",
                               f" must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError("seed", f" must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop_sequences):
            raise RequestError("stop_sequences", " must not contain an empty string")
        if self.time_limit is not None and not self.time_limit > 0:
            raise RequestError("time_limit", f" must be > 0 seconds, got {self.time_limit}")
        for name in ("logprobs", "prompt_logprobs"):
            if (n := getattr(self, name)) is not None and n < 0:
                raise RequestError(name, f" must be >= 0, got {n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                     or self.repetition_penalty != 1)


@dataclass(frozen=True)
class Request:
    """One generation request, as the engine receives it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    routing_scope: Scope | None = None
    """Who shares this request's routing groups: batch | sequence (docs/routing.md §5);
    default: the model's routing.scope."""
    arrival_time: float | None = None  # time.monotonic() when it arrived; None: when queued
    source: str = ""
    """What it came through (a server's protocol: grpc, http): carried unread to the
    request's stats, where the metrics label per-request series with it."""
