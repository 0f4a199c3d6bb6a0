"""The offline API: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.limits import QueueFullError
from ecserve.engine.text import TextStage
from ecserve.types import FinishReason, Request, SamplingParams, TokenEvent, TokenLogprobs


@dataclass(frozen=True)
class GenerationOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str  # the generated text
    token_ids: list[int]  # the generated ids
    finish_reason: FinishReason
    seed: int  # the sampling seed used (pass it back to reproduce a sampled output)
    # SamplingParams.prompt_logprobs: each prompt token's (logprob, top n), None for the first
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()


class LLM:
    """Generate from a batch of prompts, continuously batched, on one engine."""

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None):
        # The engine steps token ids; the text stage runs here, as a server's front end runs
        # it over its engine core (ecserve/server/front_end.py).
        self.engine = Engine(model, config)
        self.text = TextStage(self.engine.tokenizer)
        self._ids = itertools.count()

    def add_request(self, request: Request) -> None:
        """Queue one request (raises QueueFullError at the engine's queue bound, RequestError
        for bad input); its events come from step()."""
        self.engine.add_request(request)
        self.text.add(request)

    def step(self) -> list[TokenEvent]:
        """One engine step; its events with their text. A request whose text reached a stop
        sequence finishes here (STOP_SEQUENCE) and the engine drops it."""
        events, stopped = self.text.process(self.engine.step())
        for rid in stopped:
            self.engine.abort(rid, FinishReason.STOP_SEQUENCE)
        return events

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        routing_scope: str | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> list[GenerationOutput]:
        """Outputs in prompt order. Prompts are text, or token id lists used as given."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = [
            Request(
                request_id=f"llm-{next(self._ids)}",
                prompt_token_ids=tuple(self.engine.encode(p) if isinstance(p, str) else p),
                params=sp,
                routing_scope=routing_scope,
            )
            for p, sp in zip(prompts, params, strict=True)
        ]
        seeds, tokens, texts, prompt_lps = {}, {}, {}, {}
        finish: dict[str, FinishReason] = {}
        pending = list(reversed(requests))
        while pending or self.engine.has_unfinished():
            # Feed the queue up to its bound, so any number of prompts can be given at once.
            while pending:
                r = pending[-1]
                try:
                    self.add_request(r)
                except QueueFullError:
                    break
                pending.pop()
                seeds[r.request_id] = self.engine.seqs[r.request_id].seed
                tokens[r.request_id], texts[r.request_id] = [], []
            for ev in self.step():
                if ev.token_id is not None:
                    tokens[ev.request_id].append(ev.token_id)
                texts[ev.request_id].append(ev.text)
                if ev.prompt_logprobs:
                    prompt_lps[ev.request_id] = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    finish[ev.request_id] = ev.finish_reason
                if on_token is not None:
                    on_token(ev)
        return [
            GenerationOutput(r.request_id, r.prompt_token_ids, "".join(texts[r.request_id]),
                             tokens[r.request_id], finish[r.request_id], seeds[r.request_id],
                             prompt_lps.get(r.request_id, ()))
            for r in requests
        ]
