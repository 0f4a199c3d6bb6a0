"""host_syncs(): which torch operations in a block would wait for the device.

A CUDA graph records device work only: an operation whose result the host reads (item, bool,
nonzero behind boolean indexing, bincount sizing its output, unique, ...) cannot be captured,
or would bake one step's answer into every replay. This watches the aten operations a block
dispatches, on any device, so a CPU test can hold code to what a capture needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations whose output size or value the host must read from the device.
SYNCING = {"_local_scalar_dense", "nonzero", "nonzero_static_fallback", "masked_select",
           "bincount", "_unique", "_unique2", "unique_dim", "unique_consecutive",
           "repeat_interleave", "masked_scatter", "equal", "is_nonzero", "histc"}


@dataclass
class Seen:
    ops: list[str] = field(default_factory=list)  # every aten operation, in order
    syncs: list[str] = field(default_factory=list)  # the ones that would wait for the device


class _Watch(TorchDispatchMode):
    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = func.overloadpacket.__name__
        self.seen.ops.append(name)
        if name in SYNCING or (name.startswith("index") and _has_bool_index(args)):
            self.seen.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _has_bool_index(args: Any) -> bool:
    """aten.index / index_put with a boolean mask: a nonzero behind the scenes."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextmanager
def host_syncs() -> Iterator[Seen]:
    seen = Seen()
    with _Watch(seen):
        yield seen
