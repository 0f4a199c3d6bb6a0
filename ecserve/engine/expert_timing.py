"""Per-expert latency for the metrics: a wrapper around a layer's expert backend.

On the steps the engine samples (EngineConfig.expert_timing_every), each wrapped layer also
times every expert's GLU on that step's tokens, run alone, beside the real computation, whose
result it does not touch: the served output never depends on whether a step was timed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ecserve.model.experts import ExpertBackend, MoELayer
from ecserve.model.transformer import Transformer


class TimedExperts:
    """`inner`, plus a measurement pass on armed steps. One backend serves every MoE layer of
    a model, so the seconds are kept per layer, until `take`."""

    def __init__(self, inner: ExpertBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.graph_blocker = inner.graph_blocker
        self.armed = False
        self.seconds: dict[int, torch.Tensor] = {}  # MoE layer index -> float64 [E]

    def __call__(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> torch.Tensor:
        y = self.inner(layer, x, idx, gate)
        if self.armed:
            self.seconds[layer.layer] = time_each_expert(layer, x, idx)
        return y

    def take(self) -> dict[int, torch.Tensor]:
        seconds, self.seconds = self.seconds, {}
        return seconds


@torch.no_grad()
def time_each_expert(layer: MoELayer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float64 [E]: seconds each expert's GLU takes on its step's tokens, run alone (CUDA
    events on a GPU, a wall clock elsewhere)."""
    cuda = x.device.type == "cuda"
    out = torch.zeros(idx.shape[0], dtype=torch.float64)
    for e in range(idx.shape[0]):
        xs = x[idx[e][idx[e] >= 0]]  # [k_e, d]
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
        t0 = time.perf_counter()
        layer.expert_glu(e, xs)
        if cuda:
            end.record()
            end.synchronize()
            out[e] = start.elapsed_time(end) / 1e3
        else:
            out[e] = time.perf_counter() - t0
    return out


def timers(model: Transformer) -> list[TimedExperts]:
    """The model's timing wrappers, each once (none when the model was built without)."""
    found = {id(b.moe.experts): b.moe.experts for b in model.layers
             if b.moe is not None and isinstance(b.moe.experts, TimedExperts)}
    return list(found.values())


@contextlib.contextmanager
def armed(held: list[TimedExperts]) -> Iterator[None]:
    """Time every expert in the steps run inside."""
    for t in held:
        t.armed = True
    try:
        yield
    finally:
        for t in held:
            t.armed = False
