"""Rank 0: the engine's runner in lockstep with the worker ranks.

Rank 0 runs the whole Engine (batcher, sampler, server). Each step its runner announces the
StepPlan through ExpertParallel (the runner's Lockstep); every rank then runs the same forward on
its own full KV cache (attention and dense layers are replicated), the MoE layers exchange token
rows with their experts' owners, and only rank 0's logits are used.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import ecserve
from ecserve.config import ModelConfig
from ecserve.engine.runner import RunnerSetup
from ecserve.model.transformer import Transformer
from ecserve.parallel.group import ParallelGroup, destroy_group, free_port, init_group
from ecserve.parallel.moe_ep import (
    default_placement,
    executable_placement,
    shard_experts,
    traffic,
)
from ecserve.placement.plan import Placement
from ecserve.types import StepPlan

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


class ExpertParallel:
    """Rank 0's side of an expert-parallel group: local worker processes (127.0.0.1), or a
    group torchrun started; the engine's runner steps in lockstep with them.

    Made before the engine, then handed to it: `Engine(..., lockstep=ep.attach)` calls
    `attach` once its model and KV cache are sized, before the runner is made, and the runner
    announces each step through it (ecserve.engine.runner.Lockstep). placement: the planner's
    per-layer plan over `world` devices (None: the balanced one); rank r runs the experts whose
    primary device is r. For the smallest rank-0 footprint, build the engine with
    `experts=owned_experts(placement, 0)` (it then never loads the other experts); an engine
    holding all experts works too (they are dropped in `attach`)."""

    def __init__(self, model_cfg: ModelConfig, world: int, placement: Placement | None = None,
                 port: int | None = None, backend: str = "gloo",
                 timeout_s: float = 600.0, worker_threads: int | None = None,
                 group: ParallelGroup | None = None) -> None:
        if world < 2:
            raise ValueError(f"expert parallelism needs 2 or more ranks, got {world}")
        # Checked before any process starts.
        self.placement = executable_placement(placement or default_placement(model_cfg, world),
                                              model_cfg, world)
        self.worker_threads = worker_threads
        self.workers: list[subprocess.Popen[bytes]] = []
        self.lost: str | None = None  # why no rank can follow another step (Lockstep.lost)
        self.model: torch.nn.Module | None = None
        self._attached = False
        self._closing = threading.Event()
        if group is None:
            port = port or free_port()
            self.workers = [
                subprocess.Popen(worker_command(r, world, port, backend, timeout_s))
                for r in range(1, world)
            ]
            try:
                group = init_group(0, world, port=port, backend=backend, timeout_s=timeout_s)
            except BaseException:
                self._reap(0)
                raise
            threading.Thread(target=self._watch, name="ecserve-ep-watchdog",
                             daemon=True).start()
        self.group = group

    def attach(self, model: Transformer, setup: RunnerSetup) -> ExpertParallel:
        """Send the workers what to load, keep only rank 0's experts; the runner's Lockstep."""
        broadcast({**dataclasses.asdict(setup), "placement": self.placement,
                   "num_threads": self.worker_threads or torch.get_num_threads()})
        self._attached = True
        shard_experts(model, self.group, self.placement)
        self.model = model
        return self

    def announce(self, plan: StepPlan) -> None:
        broadcast(("step", plan))

    def traffic(self) -> dict[int, tuple[torch.Tensor, int]]:
        assert self.model is not None
        return traffic(self.model)

    def _watch(self) -> None:
        """Mark the group lost as soon as a worker process exits, so an idle server stops
        reporting SERVING (a busy one learns it from its next step's collective anyway)."""
        while not self._closing.wait(0.5):
            for rank, p in enumerate(self.workers, start=1):
                code = p.poll()
                if code is not None and not self._closing.is_set():
                    self.lost = (f"expert-parallel worker rank {rank} (pid {p.pid}) exited "
                                 f"with code {code}")
                    log.error("%s", self.lost)
                    return

    def close(self, timeout_s: float = 30.0) -> None:
        """Tell the workers to exit (once; a lost group cannot be told anything), stop them and
        leave the group (a lost group's workers get 2 s, then a kill: they may sit in a
        collective rank 0 never joins)."""
        if self._closing.is_set():
            return
        self._closing.set()
        lost = self.lost is not None
        try:
            if not lost:
                # Workers that never got their setup (the engine failed to build) wait for
                # that first message: "stop" in its place ends them too.
                broadcast(("stop", None) if self._attached else {"stop": True})
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
