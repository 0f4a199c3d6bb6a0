"""The pipeline's nouns: what a request asks for, and what the stages hand each other.

Data flows one way: Request -> (batcher) StepPlan -> (runner) logits + StepStats ->
(sampler) token ids -> (output) TokenEvent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What a request asks (light, no torch: clients and the command line import it from there).
from ecserve.request import FinishReason, Request, SamplingParams

__all__ = [
    "FinishReason", "MoEStats", "Request", "RequestStats", "SamplingParams", "ScheduledChunk",
    "StepPlan", "StepStats", "TokenEvent", "TokenLogprobs",
]


@dataclass(frozen=True)
class ScheduledChunk:
    """A run of one sequence's tokens that the model processes in this step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens fed to the model
    start_pos: int  # position of token_ids[0] in its sequence
    block_table: tuple[int, ...]  # the sequence's KV blocks, covering start_pos + len(token_ids)
    sample: bool  # the chunk reaches the newest token, so a next token is sampled from it
    # prompt_logprobs: the model also returns logits at each prompt token of the chunk but the
    # prompt's last (whose logits are the sampled ones)
    score_prompt: bool = False

    @property
    def num_scored(self) -> int:
        """Rows of prompt logits this chunk adds after the step's sampled rows."""
        return len(self.token_ids) - self.sample if self.score_prompt else 0


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
    expert_seconds: torch.Tensor | None = None  # float64 [E]: each expert's work timed alone

    @property
    def dropped(self) -> int:
        return int(self.experts_per_token[0])


TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]  # (logprob, top n (id, logprob))


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token (or a request's end without one), streamed back to the caller."""

    request_id: str
    token_id: int | None  # None: the request ended without a new token (time limit, error)
    text: str  # the text this event made final (may be "" mid-character or near a stop string)
    index: int  # 0 for the first generated token (with token_id None: tokens generated so far)
    finish_reason: FinishReason | None = None  # set on the request's last event
    logprob: float | None = None  # log-probability of token_id, when the request asked for it
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first
    detail: str = ""  # the matched stop sequence (STOP_SEQUENCE) or the error (ERROR)
    # On a request's first event, when it asked for prompt_logprobs: one entry per prompt
    # token, None for the first (nothing precedes it)
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    """What one engine step did, for metrics and debugging."""

    plan: StepPlan  # the chunks and routing groups that ran
    moe: tuple[MoEStats, ...]  # per MoE layer, in block order
    seconds: float  # wall time of the step (schedule to events)
    # (source, arrival -> first token) of the requests whose first token this step made
    time_to_first_token: tuple[tuple[str, float], ...] = ()
    inter_token_latency: tuple[float, ...] = ()  # since the previous token, the other requests
    num_running: int = 0  # after the step: requests holding KV blocks
    num_waiting: int = 0  # after the step: requests queued for admission
    kv_blocks_used: int = 0  # in some request's table
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0  # holding a prefix-cached full block, in use or not
    kv_blocks_evictable: int = 0  # cached and in no table: reused or evicted when needed
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_hit_tokens: int = 0  # of them, found there (their KV not computed again)
    preemptions: int = 0  # sequences preempted for KV blocks when this step was scheduled
    graphed: bool = False  # the step replayed a captured decode graph
    decode_graphs: int = 0  # decode graphs held after the step
    num_tokens: int = 0  # tokens the step ran (plan.num_tokens; kept when the plan is not)
    admitted: tuple[str, ...] = ()  # requests admitted (KV blocks reserved) for this step


@dataclass(frozen=True)
class RequestStats:
    """A finished request's timeline (seconds), for the serving metrics."""

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    queue_time: float  # arrival -> admitted (or -> the end, if it never was)
    prefill_time: float | None  # admitted -> first token; None without a token
    decode_time: float | None  # first token -> last token; None without a token
    e2e_time: float  # arrival -> finished
    # The engine just after the request left (its blocks freed): gauges stay true when a
    # request ends outside a step (a cancel, a time limit) and no step follows.
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_evictable: int = 0
    cached_tokens: int = 0  # its prompt tokens whose KV came from the prefix cache
    preemptions: int = 0  # times its blocks were taken and it was replayed
    source: str = ""  # Request.source: the protocol it came through
