"""The model runner: owns the device, the weights and the KV tensors; runs a step plan."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Literal, Protocol

import torch

from ecserve.config import ConfigError
from ecserve.engine.compiled_decode import CompiledDecode, compile_blocker, compiler_missing
from ecserve.engine.decode_graphs import DecodeGraphs, graph_blocker
from ecserve.engine.expert_timing import TimedExperts, armed, timers
from ecserve.model.attention import LayerKV
from ecserve.model.batch import ForwardBatch
from ecserve.model.experts import (
    BatchedExperts,
    FilledExperts,
    FusedCpuExperts,
    TritonExperts,
    small_batch_linear,
)
from ecserve.model.kernels import Kernels
from ecserve.model.transformer import Transformer
from ecserve.types import MoEStats, StepPlan

log = logging.getLogger(__name__)


def kv_bytes_per_block(model: Transformer, block_size: int) -> int:
    cfg = model.cfg
    assert cfg.num_kv_heads is not None and cfg.head_dim is not None
    elem = model.embed.element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free on `device`: CUDA's allocator view, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class RunnerLost(RuntimeError):
    """The runner can run no further step: an expert-parallel rank is gone, or a step failed
    part-way and the ranks no longer run the same collectives. The engine then fails every
    request and reports itself lost (`Engine.lost`); the server stops with exit code 1."""


def resolve_kernels(choice: str, device: torch.device) -> Literal["torch", "triton"]:
    """EngineConfig.kernels -> torch | triton for this device."""
    import ecserve_kernels

    if choice == "auto":
        return "triton" if device.type == "cuda" and ecserve_kernels.HAS_TRITON else "torch"
    if choice == "triton":
        if not ecserve_kernels.HAS_TRITON:
            raise ConfigError("kernels=triton: triton is not installed (pip install "
                              "'ecserve[gpu]'; PyTorch's CUDA wheels for Linux bring it)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"kernels=triton needs a CUDA device, got {device} (on a CPU "
                              "only Triton's interpreter runs them: TRITON_INTERPRET=1, slow)")
        return "triton"
    return "torch"


def model_kernels(choice: str, device: torch.device, time_experts: bool = False) -> Kernels:
    """The operators a model built for `device` runs (EngineConfig.kernels): Triton's on a GPU
    that has them; on a CPU under `auto`, ecserve's C++ ops (built on first use) or, where they
    cannot be built, plain torch, saying why once in the log. time_experts: the experts can
    also be timed one by one (TimedExperts), on the steps `execute` is asked to."""
    kernels = _kernels(choice, device)
    if time_experts:
        return dataclasses.replace(kernels, experts=TimedExperts(kernels.experts))
    return kernels


def _kernels(choice: str, device: torch.device) -> Kernels:
    attention = resolve_kernels(choice, device)
    if attention == "triton":
        return Kernels("triton", TritonExperts())
    if device.type != "cpu":
        return Kernels("torch", BatchedExperts())
    if choice == "auto":
        import ecserve_kernels.cpu

        why = ecserve_kernels.cpu.load()
        if why is None:
            return Kernels("torch", FusedCpuExperts(), small_batch_linear)
        log.warning("CPU ops unavailable, running plain torch (slower decode): %s", why)
    return Kernels("torch", FilledExperts())


@dataclasses.dataclass(frozen=True)
class RunnerSetup:
    """What another process needs to build the same runner (an expert-parallel worker)."""
    model_dir: str
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    kernels: str  # EngineConfig.kernels: the same operators on every rank


class Lockstep(Protocol):
    """Other processes that run every step of this runner with it, exchanging rows in its MoE
    layers (expert parallelism: ecserve.parallel.driver.ExpertParallel)."""

    lost: str | None  # why they can follow no further step; set by the runner or a watchdog

    def announce(self, plan: StepPlan) -> None:
        """Before each step: send them the plan."""

    def traffic(self) -> dict[int, tuple[torch.Tensor, int]]:
        """MoE layer -> (int64 [W, W] token rows sent rank src -> dst so far, calls so far)."""


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 table_width: int | None = None, lockstep: Lockstep | None = None) -> None:
        """table_width: block tables are padded to this many blocks (the longest sequence's),
        so the paged kernel's shapes, and its rounding, never follow the context lengths
        (None: each step's longest table). lockstep: the processes that run each step with
        this one (expert parallelism; its steps then run eagerly and time no expert)."""
        cfg = model.cfg
        assert cfg.num_kv_heads is not None and cfg.head_dim is not None
        self.model = model
        self.kernels = kernels = model.kernels.attention
        self.block_size = block_size
        self.table_width = table_width
        self.decode_graphs: DecodeGraphs | None = None
        self.compiled: CompiledDecode | None = None  # set by enable_compiled_decode
        # Decode runs go to the paged kernel (Attention.attend): no padded key layout for them.
        self.paged_decode = kernels == "triton" and cfg.position_encoding != "relative_bias"
        self.last_step_graphed = False  # whether the last execute() replayed a decode graph
        self.lockstep = lockstep
        self._lost: str | None = None
        self.device = model.embed.device
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not empty: attention gathers padded slots, and garbage could hold NaNs.
        self.kv = [
            LayerKV(torch.zeros(shape, dtype=model.embed.dtype, device=self.device),
                    torch.zeros(shape, dtype=model.embed.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]

    @property
    def lost(self) -> str | None:
        """Why no further step can run (see RunnerLost); None while steps can."""
        if self._lost is None and self.lockstep is not None:
            self._lost = self.lockstep.lost
        return self._lost

    @lost.setter
    def lost(self, why: str | None) -> None:
        self._lost = why
        if self.lockstep is not None:
            self.lockstep.lost = why

    def enable_decode_graphs(self, max_batch: int, max_graphs: int,
                             capture: bool = True) -> str | None:
        """Run decode steps of up to max_batch sequences through graphs (captured when
        `capture`; else replayed eagerly over static buffers). Returns why not, if not."""
        blocker = graph_blocker(self.model, self.kernels)
        if blocker is None and capture and self.device.type != "cuda":
            blocker = f"CUDA graphs need a CUDA device, not {self.device}"
        if blocker is None and self.table_width is None:
            blocker = "decode graphs need a fixed block table width"
        if blocker is not None:
            self.decode_graphs = None
            return blocker
        assert self.table_width is not None
        self.decode_graphs = DecodeGraphs(self.model, self.kv, self.block_size, self.table_width,
                                          max_batch, max_graphs, capture)
        return None

    @torch.inference_mode()
    def enable_compiled_decode(self, max_batch: int) -> str | None:
        """Run pure-decode steps of up to max_batch sequences through the compiled graph,
        compiled now. Returns why not, if not (compiling failed: the reason, logged)."""
        blocker = compile_blocker(self.model)
        if blocker is None and self.table_width is None:
            blocker = "the compiled decode step needs a fixed block table width"
        blocker = blocker or compiler_missing()
        if blocker is not None:
            return blocker
        assert self.table_width is not None
        try:
            compiled = CompiledDecode(self.model, self.kv, self.block_size, max_batch,
                                      self.table_width)
            seconds = compiled.warm_up()
        except Exception as exc:  # an inductor bug, a full disk: slower, never down
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            return f"compiling failed: {type(exc).__name__}: {first}"
        log.info("compiled the decode step (1 .. %d sequences) in %.1f s", max_batch, seconds)
        self.compiled = compiled
        return None

    @torch.inference_mode()
    def capture_decode_graphs(self, layouts: list[tuple[int, ...]]) -> int:
        """Capture these routing-group layouts now; returns the graphs held (0: graphs off)."""
        if self.decode_graphs is None:
            return 0
        with self.on_device():
            return self.decode_graphs.capture_layouts(layouts)

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, time_experts: bool = False
    ) -> tuple[torch.Tensor, list[MoEStats]]:
        """Run the plan; returns float32 logits [M, V] for its sampling chunks, in plan order.

        With `time_experts`, each MoE layer built with a TimedExperts backend also times every
        expert's work alone (metrics)."""
        if self.lockstep is None:
            return self._execute(plan, time_experts)
        if self.lost is not None:
            raise RunnerLost(self.lost)
        try:
            self.lockstep.announce(plan)
            # No per-expert timing: a rank holds only some experts' weights.
            return self._execute(plan, False)
        except Exception as exc:
            # A rank died (gloo: "Connection closed by peer"), or this rank failed part-way
            # through the step while the others wait in its collectives: no rank can follow
            # another step, so fail fast rather than hang until the group timeout.
            self.lost = f"expert-parallel step failed: {type(exc).__name__}: {exc}"
            raise RunnerLost(self.lost) from exc

    def _execute(self, plan: StepPlan, time_experts: bool) -> tuple[torch.Tensor, list[MoEStats]]:
        with self.on_device():
            graphs = self.decode_graphs
            self.last_step_graphed = False
            if graphs is not None and not time_experts and graphs.accepts(plan):
                out = graphs.run(plan)
                if out is not None:
                    self.last_step_graphed = True
                    # A copy even on a CPU: the graphs' logits buffer is rewritten every step.
                    return out[0].to("cpu", copy=True), out[1]
            compiled = self.compiled
            if compiled is not None and not time_experts and compiled.accepts(plan):
                try:
                    return compiled.run(plan)
                except Exception:  # costs speed, never a request: this step reruns eagerly
                    log.exception("the compiled decode step failed; decode steps run "
                                  "eagerly from now on")
                    self.compiled = None
            batch = ForwardBatch.from_plan(plan, self.model.cfg, self.block_size, self.device,
                                           self.table_width, paged_decode=self.paged_decode)
            held = timers(self.model) if time_experts else []
            with armed(held):
                logits, stats = self.model(batch, self.kv)
            seconds = {layer: t for timer in held for layer, t in timer.take().items()}
            if seconds:
                stats = [dataclasses.replace(s, expert_seconds=seconds.get(s.layer))
                         for s in stats]
            return logits.cpu(), stats

    def held_experts(self) -> int:
        """Experts whose weights this process holds, over all MoE layers (under expert
        parallelism, this rank's share)."""
        return sum(b.moe.w_gate.shape[0] for b in self.model.layers if b.moe is not None)

    def expert_traffic(self) -> dict[int, tuple[torch.Tensor, int]]:
        """MoE layer -> (int64 [W, W] token rows sent rank src -> dst so far, calls so far);
        empty on one device, where no row crosses."""
        return {} if self.lockstep is None else self.lockstep.traffic()

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Make the runner's GPU current (Triton launches and graph captures use the current
        device, which is per thread; steps may run on a worker thread)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else (
            contextlib.nullcontext())
