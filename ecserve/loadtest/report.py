"""The text report, laid out as vLLM's `benchmark_serving.py` prints its result."""

from __future__ import annotations

import math

from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.records import LoadTestResult

_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def _rule(title: str, char: str) -> str:
    return f"{title:{char}^50}"


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:.2f}"
    return f"{label:<40} {value!s}"


def describe_load(cfg: LoadTestConfig) -> str:
    if cfg.open_loop:
        rate = cfg.request_rate
        assert rate is not None
        shown = "inf (all at once)" if math.isinf(rate) else f"{rate:g} req/s"
        kind = "Poisson" if cfg.burstiness == 1 else f"gamma, burstiness {cfg.burstiness:g}"
        return f"open loop, request rate {shown}, {kind}, max in flight {cfg.max_in_flight}"
    return f"closed loop, concurrency {cfg.workers}"


def format_report(result: LoadTestResult, cfg: LoadTestConfig) -> str:
    m = result.metrics
    lines = [
        f"Load: {describe_load(cfg)}; stopped by {result.stopped_by}",
        _rule(" Serving Benchmark Result ", "="),
        _row("Successful requests:", int(m["completed"])),
        _row("Failed requests:", int(m["failed"])),
        _row("Benchmark duration (s):", m["duration"]),
        _row("Total input tokens:", int(m["total_input"])),
        _row("Total generated tokens:", int(m["total_output"])),
        _row("Request throughput (req/s):", m["request_throughput"]),
    ]
    if "goodput" in m:
        lines.append(_row("Request goodput (req/s):", m["goodput"]))
    lines += [
        _row("Output token throughput (tok/s):", m["output_throughput"]),
        _row("Total token throughput (tok/s):", m["total_token_throughput"]),
        _row("Max in-flight requests:", f"{result.max_in_flight} (cap {cfg.max_in_flight})"),
    ]
    for key, short, title in _SECTIONS:
        lines.append(_rule(title, "-"))
        lines.append(_row(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        lines.append(_row(f"P90 {short} (ms):", m[f"p90_{key}_ms"]))
        lines.append(_row(f"P99 {short} (ms):", m[f"p99_{key}_ms"]))
    if result.errors:
        lines.append(_rule("Errors by status", "-"))
        lines += [_row(f"{code}:", n) for code, n in result.errors.items()]
        example = next(r for r in result.requests if not r.success)
        if example.detail:
            lines.append(f"  e.g. {example.error}: {example.detail[:200]}")
    lines.append("=" * 50)
    if result.warmup_failed:
        lines.append(f"(warm-up: {result.warmup_failed} of {cfg.warmup_requests} failed)")
    return "\n".join(lines)
