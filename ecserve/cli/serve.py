"""Serve a model over gRPC (with Prometheus metrics, /healthz and /readyz over HTTP) until
SIGTERM or SIGINT, then drain: exit 0 after a drain, 1 when the engine can run no further
step, 2 when the server cannot start (a bad flag, a model that does not load, a port in use)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config import EngineConfig, LaunchConfig, ModelSource, ServerConfig

HELP = "serve the model over gRPC until SIGTERM, then drain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, ModelSource)
    add_flags(p.add_argument_group("server"), ServerConfig)
    add_flags(p.add_argument_group("processes"), LaunchConfig)
    add_flags(p.add_argument_group("engine"), EngineConfig, exclude=("record_steps",))


def run(args: argparse.Namespace) -> int:
    launch, server = from_flags(LaunchConfig, args), from_flags(ServerConfig, args)
    engine, model = from_flags(EngineConfig, args), from_flags(ModelSource, args).resolved()
    import torch  # OMP_WAIT_POLICY: set for every command by ecserve/openmp.py

    from ecserve.engine.core import CoreSpec, load_engine
    from ecserve.openmp import engine_core_environment
    from ecserve.server.app import serve_model

    logging.basicConfig(level=launch.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = launch.engine_threads()
    core = None
    if launch.engine_core == "process":
        core = CoreSpec(threads, launch.engine_cpus, launch.log_level,
                        tuple(engine_core_environment(launch.engine_openmp).items()))
        torch.set_num_threads(1)  # this process runs no model: its threads would only idle
    elif threads is not None:
        torch.set_num_threads(threads)
    if not launch.expert_parallel_ranks:
        return serve_model(functools.partial(load_engine, model, engine), model, server, core)
    from ecserve.parallel.launch import serve_expert_parallel

    return serve_expert_parallel(model, engine, server, launch.expert_parallel,
                                 launch.placement, launch.torchrun, core)
