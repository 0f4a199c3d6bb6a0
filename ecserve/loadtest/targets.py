"""Pass/fail targets on a run's metrics, from a JSON or TOML file and flags."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecserve.errors import ConfigError
from ecserve.loadtest.config import LATENCIES

# target name -> (metric key, ">=" or "<=", unit)
TARGETS: dict[str, tuple[str, str, str]] = {
    "min_request_throughput": ("request_throughput", ">=", "req/s"),
    "min_output_throughput": ("output_throughput", ">=", "tok/s"),
    "min_total_token_throughput": ("total_token_throughput", ">=", "tok/s"),
    "min_goodput": ("goodput", ">=", "req/s"),
    "max_error_rate": ("error_rate", "<=", ""),
    **{f"max_{stat}_{name}_ms": (f"{stat}_{name}_ms", "<=", "ms")
       for name in LATENCIES for stat in ("mean", "median", "p90", "p99")},
}
# the targets with a flag of their own (`--min-output-throughput`, ...); the file takes all
FLAG_TARGETS = ("min_request_throughput", "min_output_throughput", "min_total_token_throughput",
                "min_goodput", "max_error_rate", "max_p99_ttft_ms", "max_p99_tpot_ms",
                "max_p99_itl_ms", "max_p99_e2el_ms")


@dataclass(frozen=True)
class Verdict:
    name: str
    metric: str
    op: str
    limit: float
    value: float | None  # None: not measurable (no successful request)
    passed: bool

    def line(self) -> str:
        unit = TARGETS[self.name][2]
        shown = "n/a (no successful requests)" if self.value is None else f"{self.value:.4g}"
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.metric} = {shown} "
                f"(limit {self.op} {self.limit:g}{' ' + unit if unit else ''})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "op": self.op, "limit": self.limit,
                "value": self.value, "passed": self.passed}


def load_targets(path: str) -> dict[str, float]:
    """A flat table of TARGETS names -> numbers; JSON, or TOML for a .toml file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--targets: cannot read {path}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            data: Any = _toml().loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"--targets: {path} is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--targets: {path} must hold a table of target names to numbers")
    return check_targets(data, f"--targets {path}")


def check_targets(data: dict[str, Any], where: str = "targets") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        if key not in TARGETS:
            raise ConfigError(f"{where}: unknown target {key!r} (known: {', '.join(TARGETS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        out[key] = float(value)
    return out


def evaluate(targets: dict[str, float], metrics: dict[str, float]) -> list[Verdict]:
    """One verdict per target, in TARGETS order. Latency targets fail with no successes."""
    out = []
    for name in TARGETS:
        if name not in targets:
            continue
        metric, op, _ = TARGETS[name]
        limit = targets[name]
        if metric not in metrics:
            raise ConfigError(f"target {name} needs {metric}: give --goodput SLOs")
        value: float | None = metrics[metric]
        if metric.endswith("_ms") and not metrics.get("completed"):
            value = None
        passed = value is not None and (value >= limit if op == ">=" else value <= limit)
        out.append(Verdict(name, metric, op, limit, value, passed))
    return out


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML targets need Python 3.11+ or `pip install tomli`; "
                             "use JSON") from None
    return tomllib
