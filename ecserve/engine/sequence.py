"""A request's mutable state while the engine serves it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ecserve.engine.prefix_cache import PrefixChain
from ecserve.types import FinishReason, Request, TokenLogprobs


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # admitted: prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    arrival: int  # engine-wide arrival order; fixes the order of decode tokens in a step
    scope: str  # routing scope in force: batch | sequence
    seed: int  # the sampling seed used (the request's, or one drawn for it)
    generator: torch.Generator  # per-request RNG, seeded with `seed`
    arrival_time: float = 0.0  # time.monotonic() timeline: arrival, admission, tokens
    admitted_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    deadline: float | None = None  # time.monotonic() after which the request stops (time_limit)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated so far
    num_computed: int = 0  # tokens whose KV entries are written (or scheduled this step)
    # Its KV blocks: for the whole request at admission where it cannot be replayed, else
    # grown as it decodes (docs/kv-cache.md)
    block_table: tuple[int, ...] = ()
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    # prompt_logprobs asked: each prompt token's so far (None for the first); else None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Its blocks' keys where they may be shared (ecserve/engine/prefix_cache.py), else None
    prefix: PrefixChain | None = None
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    num_registered: int = 0  # leading blocks offered to the prefix cache
    # Its routing groups can be formed again (docs/routing.md §8): it may be preempted, its
    # blocks taken as it grows, and replayed later
    replayable: bool = False
    preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
        if self.request.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def kv_tokens_needed(self) -> int:
        """KV entries the whole request can write: every token but the last one generated."""
        return self.num_prompt + self.request.params.max_new_tokens - 1

    @property
    def num_to_prefill(self) -> int:
        """Tokens whose KV is computed before it decodes: its prompt, or after a preemption
        every token but the newest (which the next decode step feeds, as it would have)."""
        return max(self.num_prompt, len(self.token_ids) - 1)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_to_prefill
