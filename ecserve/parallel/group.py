"""The process group for expert parallelism (the placement is ecserve.placement.Placement)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

from ecserve.errors import ConfigError


@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in the expert-parallel group."""

    rank: int
    world: int

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the engine (batcher, sampler, server); the others follow its steps."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for tests and single-machine launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, addr: str = "127.0.0.1", port: int = 29500,
               backend: str = "gloo", timeout_s: float = 600.0) -> ParallelGroup:
    """Join the default process group (TCP rendezvous at addr:port); blocks until all join."""
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelGroup(rank, world)


def init_from_env(backend: str = "gloo", timeout_s: float = 600.0) -> ParallelGroup:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise ConfigError(f"--torchrun: {', '.join(missing)} not set; start ecserve with torchrun")
    dist.init_process_group(backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelGroup(dist.get_rank(), dist.get_world_size())


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
