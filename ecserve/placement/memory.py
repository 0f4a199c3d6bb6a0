"""Weight bytes: per expert, per device, and the check that a placement fits.

Every device holds all the non-expert weights (embedding, attention, dense FFNs, routers, shared
experts: expert parallelism replicates them) plus its share of the experts. The KV cache and
activations are not counted: leave room for them in --device-memory.
"""

from __future__ import annotations

import math

from ecserve.config import ModelConfig
from ecserve.errors import ConfigError
from ecserve.placement.plan import Placement, PlanError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_expert(cfg: ModelConfig, dtype: str | None = None) -> int:
    """One expert's GLU: gate, up [f, d] and down [d, f]: 3 * d * f elements."""
    return 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size * DTYPE_BYTES[dtype or cfg.dtype]


def dense_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
    """The weights every device holds: everything but the routed experts."""
    from ecserve.model.checkpoint import expected_tensors  # the model on "meta": no memory

    total = sum(math.prod(shape) for shape in expected_tensors(cfg).values())
    experts = len(cfg.moe_layers or ()) * cfg.num_experts * 3 * cfg.hidden_size \
        * cfg.expert_ffn_hidden_size
    return (total - experts) * DTYPE_BYTES[dtype or cfg.dtype]


def device_bytes(plan: Placement, per_expert: int, dense: int) -> list[int]:
    """Weight bytes each device holds under the plan."""
    return [dense + n * per_expert for n in plan.experts_per_device()]


def check_fits(plan: Placement, per_expert: int, dense: int) -> None:
    """Raise PlanError naming the numbers if some device's weights exceed its memory."""
    for dev, used in zip(plan.devices, device_bytes(plan, per_expert, dense), strict=True):
        if dev.memory_bytes is not None and used > dev.memory_bytes:
            n = plan.experts_per_device()[dev.id]
            raise PlanError(
                f"device {dev.id} needs {used} bytes ({fmt_bytes(used)}: {fmt_bytes(dense)} of "
                f"non-expert weights + {n} experts x {fmt_bytes(per_expert)}) but has "
                f"{dev.memory_bytes} ({fmt_bytes(dev.memory_bytes)}); use more devices or more "
                "memory per device"
            )


def free_bytes(plan: Placement, per_expert: int, dense: int) -> list[int | None]:
    """Bytes left on each device under the plan (None: unlimited)."""
    return [None if d.memory_bytes is None else d.memory_bytes - used
            for d, used in zip(plan.devices, device_bytes(plan, per_expert, dense), strict=True)]


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '512MiB', '1.5g', '1000000' -> bytes."""
    s = text.strip().lower()
    if s.endswith(("kb", "mb", "gb", "tb")):  # 80GB is 80G (decimal)
        s = s[:-1]
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    if unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: unknown unit {unit!r} (use e.g. 80GiB, 512MiB, "
                         "1e9)")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise ConfigError(f"memory size {text!r} is not a number with an optional unit") from None
    if not value >= 1:
        raise ConfigError(f"memory size {text!r} must be at least 1 byte")
    return int(value)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
