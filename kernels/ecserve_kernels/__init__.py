"""ecserve's Triton kernels, each beside a plain-torch reference twin (see README.md).

This folder installs as `ecserve_kernels` (not `kernels`, which is an unrelated PyPI package).
It never imports `ecserve`: the engine depends on the kernels, not the other way round.

The twins (`*_reference`, `ec_select_topk`) need only torch. The Triton ops are imported on
first use (PEP 562 `__getattr__`), so `import ecserve_kernels` works where triton is absent
(macOS, Windows); touching a Triton op there raises ImportError. `HAS_TRITON` says which.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .reference import (
    ec_select_reference,
    ec_select_topk,
    expert_mlp_reference,
    kv_cache_write_reference,
    paged_decode_attention_reference,
)


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON: bool = _has_triton()

# Triton op -> the module that defines it (imported lazily).
_TRITON_OPS: dict[str, str] = {
    "ec_select": "router_select",
    "expert_mlp": "moe_mlp",
    "paged_decode_attention": "paged_attention",
    "kv_cache_write": "paged_attention",
}

__all__ = [
    "HAS_TRITON",
    "ec_select",
    "ec_select_reference",
    "ec_select_topk",
    "expert_mlp",
    "expert_mlp_reference",
    "kv_cache_write",
    "kv_cache_write_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
]


def __getattr__(name: str) -> Any:
    module = _TRITON_OPS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not HAS_TRITON:
        raise ImportError(f"ecserve_kernels.{name} needs triton, which is not installed; "
                          f"use {name}_reference (plain torch) instead")
    return getattr(importlib.import_module(f".{module}", __name__), name)
