"""The frames between the server's front end and the engine-core process.

msgpack through msgspec, decoded into the pipeline's own dataclasses (never pickle over a
socket): one CoreInput per batch of front-end work, one CoreOutput per engine step. Tensors
(routing statistics) travel as dtype, shape and raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from ecserve.config import ModelConfig
from ecserve.engine.limits import RequestLimits
from ecserve.types import FinishReason, Request, RequestStats, StepStats, TokenEvent


@dataclass
class CoreReady:
    """The core loaded its model and takes requests."""

    pid: int
    model_name: str
    model_cfg: ModelConfig  # with the engine's routing overrides applied
    limits: RequestLimits
    dtype: str
    device: str
    held_experts: int  # expert weights the core holds (its rank's share under expert parallelism)
    expert_parallel: bool


@dataclass
class CoreHello:
    """The core's first frame: ready, or why it could not load."""

    ready: CoreReady | None = None
    error: str = ""  # the load's exception, "Type: message"
    error_type: str = ""  # its class name, so the front end raises the same kind
    user_error: bool = False  # it was bad input (ecserve.errors.UserError), not a bug


@dataclass
class CoreInput:
    """Front end -> core: everything since the last frame, applied between two steps."""

    requests: list[Request] = field(default_factory=list)
    aborts: list[tuple[str, FinishReason]] = field(default_factory=list)  # id, why
    stop: bool = False  # finish: the core leaves its loop and exits

    def __bool__(self) -> bool:
        return bool(self.requests or self.aborts or self.stop)


@dataclass
class CoreOutput:
    """Core -> front end: what one step (or one batch of inputs) did."""

    # Requests a step admitted, in a frame of their own sent as soon as the step has scheduled
    # them (before the model runs): the front end's queue room counts from these.
    admitted: list[str] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)  # without text: the front end's job
    step: StepStats | None = None  # its plan without chunks (group sizes only)
    finished: list[RequestStats] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # id, why (add_request raised)
    lost: str | None = None  # the core can run no further step, and why
    # expert parallelism: MoE layer -> ([W, W] rows sent src -> dst so far, calls so far)
    traffic: dict[int, tuple[torch.Tensor, int]] | None = None


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        a = obj.detach().cpu().contiguous().numpy()
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is torch.Tensor:
        a = np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        return torch.from_numpy(a.copy())
    raise NotImplementedError(f"cannot decode {kind.__name__}")


class Codec:
    """One side's encoder and decoders (reused: msgspec caches the types' layouts)."""

    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._hello = msgspec.msgpack.Decoder(CoreHello, dec_hook=_dec_hook)
        self._input = msgspec.msgpack.Decoder(CoreInput, dec_hook=_dec_hook)
        self._output = msgspec.msgpack.Decoder(CoreOutput, dec_hook=_dec_hook)

    def encode(self, msg: CoreHello | CoreInput | CoreOutput) -> bytes:
        return self._enc.encode(msg)

    def hello(self, frame: bytes | memoryview) -> CoreHello:
        return self._hello.decode(frame)

    def input(self, frame: bytes | memoryview) -> CoreInput:
        return self._input.decode(frame)

    def output(self, frame: bytes | memoryview) -> CoreOutput:
        return self._output.decode(frame)
