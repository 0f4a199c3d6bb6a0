"""The process group for expert parallelism and the expert placement (expert -> owner rank)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in the expert-parallel group."""

    rank: int
    world: int

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the engine (batcher, sampler, server); the others follow its steps."""
        return self.rank == 0


@dataclass(frozen=True)
class Placement:
    """owner[e]: the rank holding expert e's weights (the same for every MoE layer here)."""

    owner: tuple[int, ...]

    @staticmethod
    def contiguous(num_experts: int, world: int) -> Placement:
        """Balanced contiguous blocks: expert e on rank e * world // E."""
        if world > num_experts:
            raise ValueError(f"expert parallelism over {world} ranks needs at least {world} "
                             f"experts, the model has {num_experts}")
        return Placement(tuple(e * world // num_experts for e in range(num_experts)))

    def owned(self, rank: int) -> list[int]:
        """The experts `rank` holds, ascending."""
        return [e for e, r in enumerate(self.owner) if r == rank]


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


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
