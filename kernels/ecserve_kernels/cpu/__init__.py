"""ecserve's CPU ops (ops.cpp): `torch.ops.ecserve.linear` and `torch.ops.ecserve.moe_experts`.

Compiled for this machine (-march=native) with torch.utils.cpp_extension the first time a
process asks for them, then loaded from the build cache (TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions): the first build takes about a minute and needs a C++ compiler
(g++) and ninja. `load()` returns why they are unavailable (no compiler, a read-only cache),
and the engine then runs the plain-torch path and logs that reason once.

Each op has a fake (meta) implementation, so a torch.compile'd graph holds it as one opaque
call, and a plain-torch twin in ecserve_kernels.reference that it equals bit for bit in
float32 (cpu_linear_reference, moe_experts_reference).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 1}  # moe_experts' `act` codes
_SOURCE = Path(__file__).with_name("ops.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17"]
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "why": None once loaded, the reason when not


def _cpu_signature() -> str:
    """What -march=native compiles for: a cache shared by two machines must not mix them."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def load() -> str | None:
    """Build (first time) or load the ops; None when they are registered, else why not."""
    with _lock:
        if "why" not in _state:
            _state["why"] = _load()
        return _state["why"]


def available() -> bool:
    return load() is None


def _load() -> str | None:
    if os.environ.get("ECSERVE_CPU_OPS", "1") == "0":
        return "turned off by ECSERVE_CPU_OPS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return f"built for Linux x86_64/aarch64 only, not {platform.system()} {platform.machine()}"
    from torch.utils import cpp_extension

    source = _SOURCE.read_bytes()
    name = "ecserve_cpu_" + hashlib.sha256(source).hexdigest()[:8] + "_" + _cpu_signature()
    try:  # the build directory is made here: a read-only home fails already
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if built.is_file():  # the name carries the source's hash: nothing to rebuild
            torch.ops.load_library(built)
        else:
            cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                               is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, an unwritable cache: the torch path runs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"building {_SOURCE.name} failed ({first[:300]})"
    _register_fakes()
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("ecserve::linear")
    def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("ecserve::moe_experts")
    def _moe(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, w_gate: torch.Tensor,
             w_up: torch.Tensor, w_down: torch.Tensor, act: int) -> torch.Tensor:
        return x.new_empty(x.shape, dtype=torch.float32)
