"""What the server sees of a running engine, wherever it runs: a thread beside the event loop
(server/async_engine.py) or a process of its own (server/core_client.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ecserve.config import ModelConfig
from ecserve.engine.engine import EngineObserver
from ecserve.tokenizer import Tokenizer
from ecserve.types import Request, TokenEvent

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


class LiveEngine(Protocol):
    info: EngineInfo
    on_lost: Callable[[str], None] | None  # called on the event loop, once
    observer: EngineObserver | None  # the metrics; set once serving starts

    @property
    def lost(self) -> str | None: ...

    @property
    def num_live(self) -> int: ...

    @property
    def core_pid(self) -> int | None: ...

    def expert_traffic(self) -> Traffic | None: ...

    def submit(self, request: Request) -> asyncio.Queue[Item]: ...

    def cancel(self, request_id: str, notify: bool = False) -> None: ...

    def cancel_all(self) -> None: ...

    async def stop(self) -> None: ...
