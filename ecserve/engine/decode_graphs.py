"""Decode steps captured as CUDA graphs over static buffers, and replayed (issue 7).

Expert choice gives every expert exactly k(n) slots in a group of n tokens, so once a decode
step's routing groups are known, every shape in the forward pass is fixed: the router, the
selection, the expert MLP, the combine and the statistics run with the same shapes whatever the
tokens. A graph is therefore keyed by the step's group sizes (which fix its token count) and
holds the whole forward pass, routing included. Padding a step up to a captured size, as
token-choice engines do, would change expert choice's groups and so the model's output: each
layout gets its own graph instead, captured on first use (or ahead of time: `capture`).

What makes a step graphable: one new token per sequence, each sampled (a pure decode step),
attention through the paged kernel (block tables padded to a fixed width, so no shape follows
the context length), and a routing policy with static shapes and no host sync (`ec`, `capped`
without a per-token cap, and `token_choice` and `threshold` in their widest dropless layout, n
slots per expert: the empty ones cost compute a memory-bound decode step has to spare).
Everything else runs eagerly, as does a step that times experts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ecserve.model.attention import LayerKV
from ecserve.model.batch import ForwardBatch
from ecserve.model.transformer import Transformer
from ecserve.routing import policy_for
from ecserve.types import MoEStats, ScheduledChunk, StepPlan

log = logging.getLogger(__name__)


def graph_blocker(model: Transformer, kernels: str) -> str | None:
    """Why this model's decode steps cannot be captured (None: they can)."""
    cfg = model.cfg
    if kernels != "triton":
        return "decode graphs need the Triton kernels (paged attention over fixed-width tables)"
    if cfg.position_encoding != "rope":
        return f"position_encoding={cfg.position_encoding} attends on the torch path"
    for block in model.layers:
        moe = block.moe
        if moe is None:
            continue
        if moe.experts.graph_blocker is not None:
            return f"the {moe.experts.name} experts: {moe.experts.graph_blocker}"
        blocker = moe.policy.static_blocker(moe.routing, cfg.num_experts)
        if blocker is not None:
            return blocker
    return None


def is_decode(plan: StepPlan) -> bool:
    """One new token per sequence, each sampled: the steps decode graphs hold."""
    return all(len(c.token_ids) == 1 and c.sample for c in plan.chunks)


@dataclasses.dataclass
class _Captured:
    batch: ForwardBatch  # the static inputs: each replay reads these tensors
    stats: list[MoEStats]  # the static statistics each replay rewrites
    graph: torch.cuda.CUDAGraph | None  # None: run the forward over the buffers (no capture)


class DecodeGraphs:
    """The runner's decode-step graphs, one per routing-group layout of up to max_batch tokens.

    With `capture=False` nothing is captured: a replay runs the forward pass over the same static
    buffers. That is how the buffer handling is tested on a CPU, and a way to tell a capture
    problem from a buffer problem on a GPU.
    """

    def __init__(self, model: Transformer, kv: list[LayerKV], block_size: int, table_width: int,
                 max_batch: int, max_graphs: int, capture: bool = True) -> None:
        self.model, self.kv = model, kv
        self.block_size, self.table_width = block_size, table_width
        self.max_batch, self.max_graphs, self.capture = max_batch, max_graphs, capture
        self.device = model.embed.device
        self.graphs: dict[tuple[int, ...], _Captured] = {}
        self.disabled: str | None = None  # set when a capture failed: everything runs eagerly
        self.replays = 0
        # One logits buffer for every graph (each writes its first rows), so graphs do not
        # each keep a [S, vocab] output alive in the pool.
        self.logits = torch.empty(max_batch, model.cfg.vocab_size, dtype=torch.float32,
                                  device=self.device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def accepts(self, plan: StepPlan) -> bool:
        """Whether `plan` runs through a graph (captured now if its layout is new)."""
        if self.disabled or not plan.chunks or len(plan.chunks) > self.max_batch:
            return False
        if not is_decode(plan):
            return False
        return plan.group_sizes in self.graphs or len(self.graphs) < self.max_graphs

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[MoEStats]] | None:
        """float32 logits [S, V] on the device and the step's MoEStats; None if the layout's
        capture failed (the caller then runs the step eagerly)."""
        entry = self.graphs.get(plan.group_sizes)
        if entry is None:
            entry = self._capture_or_disable(plan.group_sizes)
            if entry is None:
                return None
        fresh = ForwardBatch.from_plan(plan, self.model.cfg, self.block_size, torch.device("cpu"),
                                       table_width=self.table_width, static_shapes=True)
        _copy_into(entry.batch, fresh)
        s = len(plan.chunks)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._forward(entry.batch, s, entry.stats)
        self.replays += 1
        return self.logits[:s], [_settled(st) for st in entry.stats]

    def capture_layouts(self, layouts: Sequence[tuple[int, ...]]) -> int:
        """Capture these group layouts ahead of the traffic; returns how many are held now."""
        for key in layouts:
            if self.disabled or len(self.graphs) >= self.max_graphs:
                break
            if key not in self.graphs and 0 < sum(key) <= self.max_batch:
                self._capture_or_disable(tuple(key))
        return len(self.graphs)

    def _capture_or_disable(self, key: tuple[int, ...]) -> _Captured | None:
        try:
            entry = self._capture(key)
        except Exception as exc:  # a capture failure costs speed, never a request
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.exception("capturing the decode graph for groups %s failed; decode steps run "
                          "eagerly from now on", key)
            return None
        self.graphs[key] = entry
        return entry

    def _capture(self, key: tuple[int, ...]) -> _Captured:
        s = sum(key)
        # Placeholder contents: every token at position 0 of block 0, writing no KV slot (-1),
        # so warming up and capturing never touch a live sequence's cache.
        chunks = tuple(ScheduledChunk(f"graph-{i}", (0,), 0, (0,), True) for i in range(s))
        batch = ForwardBatch.from_plan(StepPlan(chunks, key), self.model.cfg, self.block_size,
                                       self.device, table_width=self.table_width,
                                       static_shapes=True)
        batch.slot_mapping.fill_(-1)
        stats: list[MoEStats] = []
        if not self.capture:
            return _Captured(batch, stats, None)
        # Warm up on a side stream (Triton compiles, allocator settles), then record.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(batch, s, [])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA while a layout is captured.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._forward(batch, s, stats)
        return _Captured(batch, stats, graph)

    def _forward(self, batch: ForwardBatch, s: int, stats_out: list[MoEStats]) -> None:
        logits, stats = self.model(batch, self.kv)  # [S, V] float32
        self.logits[:s].copy_(logits)
        stats_out[:] = stats


def _settled(st: MoEStats) -> MoEStats:
    """A replay's statistics as the eager step reports them: copies (the next replay rewrites
    the buffers), and token_choice's capacity as the dropless width the eager layout has (the
    busiest expert's tokens; threshold's too), not the static layout's n."""
    tokens = st.tokens_per_expert.clone()
    slots = max(1, int(tokens.max())) if policy_for(st.policy).per_token else st.capacity_slots
    return dataclasses.replace(st, tokens_per_expert=tokens, gate_sum=st.gate_sum.clone(),
                               experts_per_token=st.experts_per_token.clone(),
                               capacity_slots=slots)


def _copy_into(dst: Any, src: Any, name: str = "batch") -> None:
    """Copy a host-built batch into the static one: tensors by value, everything else (group
    bounds, block size, which fields are None) must already match."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src, non_blocking=True)
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            _copy_into(getattr(dst, f.name), getattr(src, f.name), f"{name}.{f.name}")
    elif isinstance(dst, tuple) and isinstance(src, tuple) and len(dst) == len(src):
        for i, (a, b) in enumerate(zip(dst, src, strict=True)):
            _copy_into(a, b, f"{name}[{i}]")
    elif dst != src:
        raise ValueError(f"static decode batch: {name} is {dst!r}, the step has {src!r}")
