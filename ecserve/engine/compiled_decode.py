"""Pure-decode steps through one torch.compile'd graph (EngineConfig.decode = "compiled").

A decode step of the eager model is a few hundred small operators, each paying Python's and
the dispatcher's overhead, which on a CPU costs more than the step's arithmetic. Compiled, the
step is one graph: inductor fuses the elementwise work (norms, rope, residuals, routing) into
a few C++ loops, and the model's own operators (ecserve's CPU linear and fused MoE op) stay
single opaque calls inside it.

Which steps: one new token per sequence, each sampled, rope attention on the torch path, and a
per-token routing policy (`threshold`, `token_choice`): those route each token on its own
(docs/routing.md §4), so the graph needs no group layout and no padding, and its output is the
eager step's. Steps that mix sequences in routing groups (`ec`, `capped`), prefill chunks, and
steps that time experts run eagerly. Two graphs serve every batch size: one for a single
sequence and one with the batch and the block-table width symbolic (2 .. max_batch).
"""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Any

import torch

from ecserve.engine.decode_graphs import is_decode
from ecserve.model.attention import LayerKV
from ecserve.model.decode import decode_forward
from ecserve.model.transformer import Transformer
from ecserve.routing import ROUTING_POLICIES, policy_for
from ecserve.types import MoEStats, StepPlan

log = logging.getLogger(__name__)
# The test suite sets it to 0: compiling costs seconds to a minute for every engine it starts.
KILL_SWITCH = "ECSERVE_COMPILED_DECODE"
MIN_TABLE = 2  # block tables are padded to at least this width: dynamo specialises a size of 1
# The symbolic sizes' ranges, the same for every engine: inductor's graph cache is shared by all
# processes, and a graph cached for a narrower range would guard a wider one out.
MAX_BATCH, MAX_TABLE = 4096, 1 << 20


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """fn with a code object of its own: dynamo keeps graphs per code object (a partial would
    share torch.compile's wrapper's), and one engine's graphs (guarded on its model and cache)
    must never be tried for another engine's model in the same process (tests and benchmarks
    hold several)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def compile_blocker(model: Transformer) -> str | None:
    """Why this model's decode steps cannot run compiled (None: they can)."""
    cfg = model.cfg
    if os.environ.get(KILL_SWITCH, "1") == "0":
        return f"turned off by {KILL_SWITCH}=0"
    if model.embed.device.type != "cpu":
        return "the compiled decode step runs on CPUs (GPUs replay CUDA graphs)"
    if model.kernels.attention != "torch":
        return f"attention={model.kernels.attention}"
    if cfg.position_encoding != "rope":
        return f"position_encoding={cfg.position_encoding}"
    if not policy_for(cfg.routing.policy).per_token:
        per_token = [p.name for p in ROUTING_POLICIES.values() if p.per_token]
        return (f"routing policy {cfg.routing.policy!r} mixes sequences in its groups "
                f"(compiled: {', '.join(per_token)})")
    if any(b.moe is not None and b.moe.experts.name == "expert-parallel" for b in model.layers):
        return "expert parallelism exchanges rows between processes each step"
    return None


def compiler_missing() -> str | None:
    """Why inductor cannot build C++ here (None: it can); asked before compiling, so a machine
    without a compiler says so in one line instead of a traceback from inside inductor."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:
        return f"no C++ compiler ({str(exc).strip().splitlines()[0][:200]})"
    return None


class CompiledDecode:
    def __init__(self, model: Transformer, kv: list[LayerKV], block_size: int,
                 max_batch: int, table_width: int) -> None:
        self.model, self.block_size = model, block_size
        if max_batch > MAX_BATCH or table_width > MAX_TABLE:
            raise ValueError(f"compiled decode: at most {MAX_BATCH} sequences of {MAX_TABLE} "
                             "blocks")
        self.max_batch = max_batch

        def step(*inputs: torch.Tensor) -> Any:
            return decode_forward(model, kv, *inputs, block_size=block_size)

        # cpp_wrapper: the graph's calls run from C++, not a Python function (batch-1 steps
        # 1.07x-1.15x faster here; compiling takes no longer).
        self.fn = torch.compile(_own_code(step), fullgraph=True, options={"cpp_wrapper": True})
        self.steps = 0

    def accepts(self, plan: StepPlan) -> bool:
        return 0 < len(plan.chunks) <= self.max_batch and is_decode(plan)

    def warm_up(self) -> float:
        """Compile both graphs now (placeholder tokens writing KV slot 0, before any sequence
        holds a block); returns the seconds it took."""
        t0 = time.perf_counter()
        for b in (1, min(2, self.max_batch)):
            self._call(*self._placeholder(b), mark=True)
        return time.perf_counter() - t0

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[MoEStats]]:
        """float32 logits [B, V] and the step's MoEStats, as the eager step gives them."""
        chunks = plan.chunks
        width = max(MIN_TABLE, max(len(c.block_table) for c in chunks))
        # One tensor from padded lists: a per-row copy would be B more operators a step.
        tables = torch.tensor([[*c.block_table, *[0] * (width - len(c.block_table))]
                               for c in chunks])
        bs = self.block_size
        pos = torch.tensor([c.start_pos for c in chunks])
        slots = [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks]
        inputs = (torch.tensor([c.token_ids[0] for c in chunks]), pos, torch.tensor(slots),
                  tables, pos + 1)
        logits, raw = self._call(*inputs)
        self.steps += 1
        policy = self.model.cfg.routing.policy
        stats = [MoEStats(layer=layer, policy=policy, group_sizes=plan.group_sizes,
                          # the dropless width the eager layout has: the busiest expert's
                          capacity_slots=max(1, int(tokens.max())), tokens_per_expert=tokens,
                          gate_sum=gate_sum, experts_per_token=hist)
                 for tokens, gate_sum, hist, layer in raw]
        return logits, stats

    def _call(self, *inputs: torch.Tensor, mark: bool = False
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]]:
        if mark:  # compile with the batch (above one) and the table width symbolic
            b = inputs[0].shape[0]
            if b > 1:
                for t in inputs:
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=MAX_BATCH)
            torch._dynamo.mark_dynamic(inputs[3], 1, min=MIN_TABLE, max=MAX_TABLE)
        return self.fn(*inputs)

    def _placeholder(self, b: int) -> tuple[torch.Tensor, ...]:
        # Five distinct tensors, as a step's are: dynamo guards on inputs aliasing each other,
        # and graphs compiled for one shared `zeros` were recompiled at the first real step.
        def zeros() -> torch.Tensor:
            return torch.zeros(b, dtype=torch.long)

        return (zeros(), zeros(), zeros(), torch.zeros(b, MIN_TABLE, dtype=torch.long),
                zeros() + 1)

