"""vLLM's serving metrics (benchmarks/benchmark_serving.py, `vllm bench serve`) from records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from ecserve.loadtest.config import LATENCIES
from ecserve.loadtest.records import RequestRecord

PERCENTILES = (90, 99)


def calculate_metrics(records: Sequence[RequestRecord], duration: float,
                      slos_ms: dict[str, float] | None = None) -> dict[str, float]:
    """Throughputs over `duration`; TTFT, TPOT, E2EL per successful request, ITL per chunk gap
    (all requests' gaps pooled); mean, median, std and percentiles in ms, numpy's linear
    interpolation; 0 where there are no samples, as vLLM. Goodput: successful requests per
    second whose TTFT, TPOT (0 for one-token outputs) and E2EL all meet `slos_ms`."""
    ok = [r for r in records if r.success]
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    total_input = sum(r.input_len or 0 for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    dur = duration if duration > 0 else float("nan")
    failed = len(records) - len(ok)
    m: dict[str, float] = {
        "completed": len(ok), "failed": failed,
        "error_rate": failed / len(records) if records else 0.0,
        "duration": duration, "total_input": total_input, "total_output": total_output,
        "request_throughput": len(ok) / dur, "output_throughput": total_output / dur,
        "total_token_throughput": (total_input + total_output) / dur,
    }
    for name in LATENCIES:
        values = np.asarray(samples[name] or [0.0]) * 1000.0
        m[f"mean_{name}_ms"] = float(np.mean(values))
        m[f"std_{name}_ms"] = float(np.std(values))
        m[f"median_{name}_ms"] = float(np.median(values))
        for p in PERCENTILES:
            m[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    if slos_ms:
        good = sum(_meets(r, slos_ms) for r in ok)
        m["goodput"] = good / dur
    return m


def _meets(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(measured[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def errors_by_code(records: Sequence[RequestRecord]) -> dict[str, int]:
    counts = Counter(r.error or "UNKNOWN" for r in records if not r.success)
    return dict(sorted(counts.items()))
