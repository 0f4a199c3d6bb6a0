"""`ecserve serve --expert-parallel N` and `ecserve serve --torchrun`: who serves, who follows.

One machine: this process is rank 0 and starts N-1 local workers. Several machines: torchrun
starts one process per device everywhere and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
rank 0 serves, the other ranks hold their experts and follow rank 0's steps.
"""

from __future__ import annotations

import logging
import os
import signal

from ecserve.config import EngineConfig, ServerConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir
from ecserve.model.weights import read_config
from ecserve.parallel.driver import ExpertParallel
from ecserve.parallel.group import ParallelGroup, destroy_group, init_from_env
from ecserve.parallel.moe_ep import default_placement, executable_placement, owned_experts
from ecserve.parallel.worker import run_worker
from ecserve.placement.plan import load_plan
from ecserve.server.app import serve

log = logging.getLogger(__name__)


def serve_expert_parallel(
    model: str | None, engine_cfg: EngineConfig, server_cfg: ServerConfig, world: int | None,
    placement_path: str | None, torchrun: bool,
) -> int:
    """Serve with the experts spread over `world` ranks (torchrun: over WORLD_SIZE ranks)."""
    model_cfg = read_config(model or default_model_dir())
    group: ParallelGroup | None = None
    if torchrun:
        cuda = engine_cfg.device.startswith("cuda")
        group = init_from_env("nccl" if cuda else "gloo")
        world = group.world
    assert world is not None
    try:
        # The plan is checked against the model and the ranks before any weights load.
        placement = (executable_placement(load_plan(placement_path, model_cfg), model_cfg, world)
                     if placement_path else default_placement(model_cfg, world))
        if group is not None and not group.is_driver:
            # Rank 0's drain ends this rank (its "stop"), so a signal must not cut it short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            steps = run_worker(group, int(os.environ.get("LOCAL_RANK", group.rank)))
            log.info("expert-parallel rank %d: %d steps, stopping", group.rank, steps)
            destroy_group()
            return 0
    except BaseException:
        if group is not None:
            destroy_group()
        raise
    handles: list[ExpertParallel] = []

    def load() -> Engine:
        # Rank 0 reads only its own experts from the checkpoint, as the workers do.
        engine = Engine(model, engine_cfg, experts=owned_experts(placement, 0))
        handles.append(ExpertParallel(engine, world, placement, group=group))
        return engine

    try:
        return serve(load, server_cfg)
    finally:
        for handle in handles:  # after the drain: the engine thread has stopped
            handle.close()
