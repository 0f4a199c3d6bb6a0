"""`ecserve serve --expert-parallel N` and `ecserve serve --torchrun`: who serves, who follows.

One machine: this process is rank 0 and starts N-1 local workers. Several machines: torchrun
starts one process per device everywhere and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
rank 0 serves, the other ranks hold their experts and follow rank 0's steps.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable

from ecserve.config import EngineConfig, ServerConfig
from ecserve.engine.core import CoreSpec
from ecserve.engine.engine import Engine
from ecserve.errors import ConfigError
from ecserve.model.default import default_model_dir
from ecserve.model.weights import read_config
from ecserve.parallel.driver import ExpertParallel
from ecserve.parallel.group import ParallelGroup, destroy_group, init_from_env
from ecserve.parallel.moe_ep import default_placement, executable_placement, owned_experts
from ecserve.parallel.worker import run_worker
from ecserve.placement.plan import Placement, load_plan
from ecserve.server.app import serve_model

log = logging.getLogger(__name__)


def serve_expert_parallel(
    model: str | None, engine_cfg: EngineConfig, server_cfg: ServerConfig, world: int | None,
    placement_path: str | None, torchrun: bool, core: CoreSpec | None,
) -> int:
    """Serve with the experts spread over `world` ranks (torchrun: over WORLD_SIZE ranks).
    Rank 0 is the engine core (its own process unless `core` is None); the server beside it."""
    model_cfg = read_config(model or default_model_dir())
    if torchrun:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
        if missing:
            raise ConfigError(f"--torchrun: {', '.join(missing)} not set; start ecserve with "
                             "torchrun")
        world = int(os.environ["WORLD_SIZE"])
        if int(os.environ["RANK"]) != 0:
            return _follow(engine_cfg)
    assert world is not None
    # The plan is checked against the model and the ranks before any weights load.
    placement = (executable_placement(load_plan(placement_path, model_cfg), model_cfg, world)
                 if placement_path else default_placement(model_cfg, world))
    load = functools.partial(load_expert_parallel, model, engine_cfg, world, placement, torchrun)
    return serve_model(load, model, server_cfg, core)


def load_expert_parallel(model: str | None, engine_cfg: EngineConfig, world: int,
                         placement: Placement, torchrun: bool
                         ) -> tuple[Engine, Callable[[], None]]:
    """Rank 0 (an EngineLoader): join or start the group, load rank 0's experts, and return
    the engine with what stops the workers and leaves the group."""
    group: ParallelGroup | None = None
    if torchrun:
        group = init_from_env("nccl" if engine_cfg.device.startswith("cuda") else "gloo")
    try:
        ep = ExpertParallel(read_config(model or default_model_dir()), world, placement,
                            group=group)
    except BaseException:
        if group is not None:
            destroy_group()
        raise
    try:
        # Rank 0 reads only its own experts from the checkpoint, as the workers do.
        engine = Engine(model, engine_cfg, experts=owned_experts(placement, 0),
                        lockstep=ep.attach)
    except BaseException:
        ep.close()
        raise
    return engine, ep.close


def _follow(engine_cfg: EngineConfig) -> int:
    """A torchrun rank other than 0: hold experts and follow rank 0's steps until it stops."""
    group = init_from_env("nccl" if engine_cfg.device.startswith("cuda") else "gloo")
    # Rank 0's drain ends this rank (its "stop"), so a signal must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        steps = run_worker(group, int(os.environ.get("LOCAL_RANK", group.rank)))
        log.info("expert-parallel rank %d: %d steps, stopping", group.rank, steps)
    finally:
        destroy_group()
    return 0
