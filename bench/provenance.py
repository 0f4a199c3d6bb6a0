"""Where a benchmark's figures came from: the script, the command, the date and the machine.

Every bench script that writes `--json` puts `stamp(__file__, argv)` at the top of its JSON, so
that bench/tables.py can render the result (docs/benchmarks.md) with what produced it:

    {"benchmark": "bench_decode_floor",
     "command": "python bench/bench_decode_floor.py --json out.json",
     "date": "2026-11-27",
     "machine": {"platform": ..., "cpu": ..., "cpus": 2, "python": ..., "torch": ..., ...}}

Nothing here imports torch: soak.py times a server, not a model, and must not pay for it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

# The OpenMP settings a CPU timing depends on (docs/serving.md, "CPU servers and OpenMP").
OPENMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# What the scripts (and ecserve itself) set when the environment does not: not worth a prefix.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def openmp_env() -> str:
    """The OpenMP variables set in this process, e.g. 'OMP_WAIT_POLICY=PASSIVE'."""
    return " ".join(f"{k}={os.environ[k]}" for k in OPENMP_VARS if k in os.environ)


def cpu_name() -> str:
    """The CPU model ('Intel(R) Xeon(R) Processor'); platform.processor() is often empty."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dist_version(name: str) -> str | None:
    """An installed distribution's version, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(*packages: str, **extra: object) -> dict[str, object]:
    """The machine and the versions a timing depends on: platform, CPU model, logical CPUs,
    Python, torch (and its threads when the script has loaded it), the OpenMP settings,
    ecserve and each of `packages` that is installed (distribution names), then `extra`."""
    info: dict[str, object] = {"platform": platform.platform(), "cpu": cpu_name(),
                               "cpus": os.cpu_count(), "python": platform.python_version()}
    torch = sys.modules.get("torch")  # the script's threads, as they were when it ran
    info["torch"] = torch.__version__ if torch else dist_version("torch")
    if torch:
        info["torch_threads"] = torch.get_num_threads()
    if openmp_env():
        info["openmp"] = openmp_env()
    for name in ("ecserve", *packages):
        version = dist_version(name)
        if version:
            info[name.replace("-", "_")] = version
    info.update(extra)
    return {k: v for k, v in info.items() if v is not None}


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line as run: `python` and sys.argv, shell-quoted, or `bench/<script>` and
    argv when main() was called with one (a test). OpenMP variables the scripts would not set
    themselves come first, since they change the figures (GOMP_SPINCOUNT=100000 ...)."""
    args = sys.argv if argv is None else [f"bench/{Path(script).name}", *argv]
    env = [f"{k}={os.environ[k]}" for k in OPENMP_VARS
           if k in os.environ and os.environ[k] != OPENMP_DEFAULTS.get(k)]
    return shlex.join([*env, "python", *args])


def today() -> str:
    """Today's date in UTC, YYYY-MM-DD: the date a result was measured."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def stamp(script: str, argv: list[str] | None = None, packages: tuple[str, ...] = (),
          **extra: object) -> dict[str, object]:
    """The keys every results JSON starts with: benchmark (the script's name), command, date
    and machine (see machine(); `packages` and `extra` go there)."""
    return {"benchmark": Path(script).stem, "command": command(script, argv), "date": today(),
            "machine": machine(*packages, **extra)}
