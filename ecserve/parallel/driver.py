"""Rank 0: the engine's runner in lockstep with the worker ranks.

Rank 0 runs the whole Engine (batcher, sampler, server). Each step it broadcasts the StepPlan;
every rank then runs the same forward on its own full KV cache (attention and dense layers are
replicated), the MoE layers exchange token rows with their experts' owners, and only rank 0's
logits are used.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import ecserve
from ecserve.engine.runner import ModelRunner, RunnerLost
from ecserve.parallel.group import ParallelGroup, destroy_group, free_port, init_group
from ecserve.parallel.moe_ep import (
    default_placement,
    executable_placement,
    shard_experts,
    traffic,
)
from ecserve.placement.plan import Placement
from ecserve.types import MoEStats, StepPlan

log = logging.getLogger(__name__)


def broadcast(message: object) -> object:
    """Rank 0's message to every rank (the others pass None and get it back)."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker_command(rank: int, world: int, port: int, backend: str, timeout_s: float) -> list[str]:
    """A local worker rank's command line. It imports the driver's own ecserve: `python -m`
    would put the current directory first on sys.path, and a source checkout there (another
    version of ecserve) would then run in the workers but not in the driver."""
    home = str(Path(ecserve.__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path.insert(0, {home!r}); "
            "from ecserve.parallel.worker import main; sys.exit(main())")
    return [sys.executable, "-c", boot, "--rank", str(rank), "--world", str(world),
            "--port", str(port), "--backend", backend, "--timeout", str(timeout_s)]


class DriverRunner(ModelRunner):
    """Rank 0's ModelRunner: broadcasts each plan, then runs it like every other rank."""

    def __init__(self, inner: ModelRunner, group: ParallelGroup) -> None:
        self.__dict__.update(inner.__dict__)  # same model, KV tensors, kernels (no new cache)
        # Graphs captured before the experts were sharded would replay one rank's MoE alone;
        # every step here also runs collectives with the other ranks, so it runs eagerly.
        self.decode_graphs = None
        self.group = group
        self.closed = False  # `lost` (inherited) is set by a failed step or the watchdog

    def execute(
        self, plan: StepPlan, time_experts: bool = False
    ) -> tuple[torch.Tensor, list[MoEStats]]:
        if self.lost is not None:
            raise RunnerLost(self.lost)
        try:
            broadcast(("step", plan))
            # Per-expert timing is off here: a rank holds only some experts' weights.
            return super().execute(plan, False)
        except Exception as exc:
            # A rank died (gloo: "Connection closed by peer"), or this rank failed part-way
            # through the step while the others wait in its collectives: no rank can follow
            # another step, so fail fast rather than hang until the group timeout.
            self.lost = f"expert-parallel step failed: {type(exc).__name__}: {exc}"
            raise RunnerLost(self.lost) from exc

    def expert_traffic(self) -> dict[int, tuple[torch.Tensor, int]]:
        return traffic(self.model)

    def close(self) -> None:
        """Tell the workers to exit (once; a lost group cannot be told anything)."""
        if self.closed:
            return
        self.closed = True
        if self.lost is None:
            broadcast(("stop", None))


class ExpertParallel:
    """Rank 0's handle on an expert-parallel group of local worker processes (127.0.0.1).

    placement: the planner's per-layer plan over `world` devices (None: the balanced one);
    rank r runs the experts whose primary device is r. For the smallest rank-0 footprint, build
    the engine with `Engine(..., experts=owned_experts(placement, 0))` (it then never loads the
    other experts); an engine holding all experts works too (they are dropped here)."""

    def __init__(self, engine, world: int, placement: Placement | None = None,
                 port: int | None = None, backend: str = "gloo",
                 timeout_s: float = 600.0, worker_threads: int | None = None,
                 group: ParallelGroup | None = None) -> None:
        if world < 2:
            raise ValueError(f"expert parallelism needs 2 or more ranks, got {world}")
        if placement is not None:  # before starting any process
            executable_placement(placement, engine.model_cfg, world)
        self.worker_threads = worker_threads
        self.workers: list[subprocess.Popen[bytes]] = []
        self._closing = threading.Event()
        if group is not None:  # joined already (torchrun started the other ranks)
            self.runner = enable_expert_parallel(engine, group, placement, worker_threads)
            return
        port = port or free_port()
        self.workers = [
            subprocess.Popen(worker_command(r, world, port, backend, timeout_s))
            for r in range(1, world)
        ]
        try:
            group = init_group(0, world, port=port, backend=backend, timeout_s=timeout_s)
            self.runner = enable_expert_parallel(engine, group, placement, worker_threads)
        except BaseException:
            self._reap(0)
            raise
        threading.Thread(target=self._watch, name="ecserve-ep-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Mark the group lost as soon as a worker process exits, so an idle server stops
        reporting SERVING (a busy one learns it from its next step's collective anyway)."""
        while not self._closing.wait(0.5):
            for rank, p in enumerate(self.workers, start=1):
                code = p.poll()
                if code is not None and not self._closing.is_set():
                    self.runner.lost = (f"expert-parallel worker rank {rank} (pid {p.pid}) "
                                        f"exited with code {code}")
                    log.error("%s", self.runner.lost)
                    return

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the workers and leave the group (a lost group's workers get 2 s, then a kill:
        they may sit in a collective rank 0 never joins)."""
        self._closing.set()
        lost = self.runner.lost is not None
        try:
            self.runner.close()
        finally:
            if not lost:  # a broken group's teardown can wait on the dead peer
                destroy_group()
            self._reap(2.0 if lost else timeout_s)

    def _reap(self, timeout_s: float) -> None:
        for p in self.workers:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("expert-parallel worker %d did not exit; killing it", p.pid)
                p.kill()
                p.wait()


def enable_expert_parallel(engine, group: ParallelGroup, placement: Placement | None = None,
                           worker_threads: int | None = None) -> DriverRunner:
    """Rank 0, after joining the group: send the workers what to load, keep only rank 0's
    experts, and run the engine's steps in lockstep with them."""
    mc = engine.model_cfg
    placement = executable_placement(placement or default_placement(mc, group.world), mc,
                                     group.world)
    runner = engine.runner
    broadcast({
        "model_dir": str(engine.model_dir),
        "dtype": engine.dtype_name,
        "device": str(engine.device),
        "num_blocks": engine.blocks.num_blocks,
        "block_size": engine.cfg.block_size,
        "kernels": engine.cfg.kernels,  # the same operators on every rank
        "placement": placement,
        "num_threads": worker_threads or torch.get_num_threads(),
    })
    shard_experts(runner.model, group, placement)
    engine.runner = DriverRunner(runner, group)
    return engine.runner
