"""The front end's nouns for a running engine, wherever its core runs: what the model is
(EngineInfo), what a request's queue carries (Item), and how events reach the queues."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecserve.config import ModelConfig
from ecserve.tokenizer import Tokenizer
from ecserve.types import TokenEvent

Item = TokenEvent | Exception  # what a request's queue carries; an Exception ends the request
Traffic = dict[int, tuple[Any, int]]  # MoE layer -> ([W, W] rows sent src -> dst, calls)


@dataclass(frozen=True)
class EngineInfo:
    """The model being served, as ModelInfo, the tokenizer endpoints and the metrics need it."""

    model_name: str
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int
    dtype_name: str
    device: str
    held_experts: int  # expert weights this replica's engine holds (rank 0's share under EP)
    model_dir: Path  # where the model was read from (its chat template, if any)
    kv_blocks: int  # blocks in the whole KV cache

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> ids, with the model's BOS token first when it has one."""
        bos = self.model_cfg.bos_token_id
        return ([bos] if bos is not None else []) + self.tokenizer.encode(prompt)


def deliver(streams: dict[str, asyncio.Queue[Item]], events: Iterable[TokenEvent]
            ) -> list[str]:
    """Put each event on its request's queue (dropped when its client left meanwhile); the ids
    of the streams that just finished, which are removed from `streams`."""
    finished = []
    for event in events:
        queue = streams.get(event.request_id)
        if queue is None:
            continue
        queue.put_nowait(event)
        if event.finished:
            del streams[event.request_id]
            finished.append(event.request_id)
    return finished
