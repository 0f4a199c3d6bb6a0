"""What `ecserve plan` is asked: devices, memory, strategy, the traffic its statistics come
from. Light (no torch), so the command line's parser can use it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ecserve.config.fields import flag
from ecserve.placement.plan import Strategy


@dataclass(frozen=True)
class PlanOptions:
    devices: int | None = field(default=None, metadata=flag(metavar="N"))
    """Devices to place the experts on (or --load a plan)."""
    device_memory: str | None = field(default=None, metadata=flag(metavar="SIZE"))
    """Weight memory per device, e.g. 80GiB, 512MiB, 1e9; default: unlimited."""
    strategy: Strategy = "affinity"
    """balanced: contiguous equal shares; affinity: equal shares, with experts that choose the
    same tokens on the same device."""
    replicate: bool = False
    """Copy the hottest experts onto other devices while memory allows."""
    prompts: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """A file of prompts, one per line, for the routing statistics."""
    synthetic_requests: int = field(default=8, metadata=flag(metavar="N"))
    """Random prompts for the routing statistics, without --prompts."""
    max_new_tokens: int = field(default=16, metadata=flag(metavar="N"))
    """Tokens generated per prompt while the routing is recorded."""
    device: str = "cpu"
    """Where the statistics run is made."""
    seed: int = 0
    """Seeds the synthetic prompts and the planner."""
    save: str | None = field(default=None, metadata=flag(metavar="PLAN.json"))
    """Write the placement to this JSON file."""
    load: str | None = field(default=None, metadata=flag(metavar="PLAN.json"))
    """Evaluate a saved placement instead of making one."""
