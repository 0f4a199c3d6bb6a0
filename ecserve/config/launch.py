"""Which model to load, and how `ecserve serve` lays out its processes: the engine core's
process and threads, CPU pinning, expert-parallel ranks, logging."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from ecserve.config.fields import check_choices, flag
from ecserve.errors import ConfigError

MODEL_ENV = "ECSERVE_MODEL"


@dataclass(frozen=True)
class ModelSource:
    """The model a command loads."""

    model: str | None = field(default=None, metadata=flag(metavar="DIR"))
    """Model directory (an ecserve checkpoint or a Hugging Face MoE directory); default:
    $ECSERVE_MODEL, else the shipped model, ecserve-code."""

    def resolved(self) -> str | None:
        """The directory to load; None: the shipped default model."""
        return self.model or os.environ.get(MODEL_ENV) or None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"1-3,6" -> (1, 2, 3, 6); the CPUs must be ones this process may use."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ConfigError(f"engine_cpus: {text!r} is not a CPU list like 1-3,6",
                          field="engine_cpus") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise ConfigError(f"engine_cpus: {text!r} names CPUs this process cannot use (it may "
                          f"use {sorted(allowed)})", field="engine_cpus")
    return tuple(sorted(set(cpus)))


@dataclass(frozen=True)
class LaunchConfig:
    """How `ecserve serve` runs: the engine core's process and threads, expert parallelism."""

    engine_core: Literal["process", "thread"] = "process"
    """Where the engine steps: its own process, talking to the server's over ZMQ, or a thread
    of the server's process (one process, one GIL: for debugging)."""
    torch_threads: int | None = None
    """The engine's torch CPU threads; default: $OMP_NUM_THREADS, else all cores but one, which
    the server's gRPC work and event loop keep."""
    engine_openmp: Literal["spin", "passive"] = "spin"
    """How the engine-core process's idle OpenMP threads wait: spin (busy-wait up to 300,000
    spins, a few milliseconds, then sleep: a step's parallel regions start without waking
    threads) or passive (sleep at once, as the server's own threads do). An OMP_WAIT_POLICY
    in the environment wins."""
    engine_cpus: tuple[int, ...] | None = field(default=None, metadata=flag(
        metavar="LIST", parse=parse_cpu_list))
    """Pin the engine-core process to these CPUs (e.g. 1-15 or 2,3); default: no pinning."""
    expert_parallel: int = field(default=1, metadata=flag(metavar="N"))
    """Run the MoE experts across N processes on this machine (torch.distributed, gloo): the
    engine core is rank 0, N-1 workers hold the other experts."""
    torchrun: bool = False
    """Expert parallelism across the processes torchrun started (on one or more machines):
    rank 0 serves, the others hold experts."""
    placement: str | None = field(default=None, metadata=flag(metavar="PLAN.json"))
    """With expert parallelism, the expert placement to run: a plan from `ecserve plan
    --devices N --save PLAN.json` (rank r holds the experts whose primary device is r; plans
    with replicas are refused for now); default: balanced contiguous shares."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field(
        default="INFO", metadata=flag(parse=str.upper))
    """Logging threshold of the server and its engine core."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"--torch-threads must be >= 1, got {self.torch_threads}",
                              field="torch_threads")
        if self.expert_parallel < 1:
            raise ConfigError(f"--expert-parallel must be >= 1, got {self.expert_parallel}",
                              field="expert_parallel")
        if self.engine_cpus is not None and self.engine_core != "process":
            raise ConfigError("--engine-cpus pins the engine-core process: drop --engine-core "
                              "thread", field="engine_cpus")
        if self.torchrun and self.expert_parallel > 1:
            raise ConfigError("--torchrun takes the number of ranks from torchrun; drop "
                              "--expert-parallel", field="expert_parallel")
        if self.placement is not None and self.expert_parallel < 2 and not self.torchrun:
            raise ConfigError("--placement needs --expert-parallel N with N >= 2",
                              field="placement")

    def engine_threads(self) -> int | None:
        """torch_threads, or all cores but one unless $OMP_NUM_THREADS says; None: torch's."""
        if self.torch_threads is not None or "OMP_NUM_THREADS" in os.environ:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) - 1)

    @property
    def expert_parallel_ranks(self) -> bool:
        """Whether the experts are spread over several processes."""
        return self.expert_parallel > 1 or self.torchrun
