"""What a run measured: one RequestRecord per request, and the LoadTestResult of the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request. Times are seconds since the benchmark's start (perf_counter)."""

    index: int
    input_len: int | None  # the server's input_token_count once it answers
    requested_output_len: int
    start: float = 0.0
    end: float = 0.0  # when the call finished, whatever the outcome
    ttft: float = 0.0  # first chunk with tokens - start
    latency: float = 0.0  # last chunk with tokens - start (vLLM's E2EL)
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    chunk_times: list[float] = field(default_factory=list)  # each token chunk's arrival
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each chunk
    output_tokens: int = 0
    success: bool = False
    error: str | None = None  # gRPC status code name (or STOP_REASON_* / CLIENT_ERROR)
    detail: str = ""
    stop_reason: str = ""
    cancelled_by_us: bool = False  # set when the drain timeout cancels it

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1), for successes with > 1 output token."""
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "success": self.success, "error": self.error,
            "detail": self.detail, "stop_reason": self.stop_reason,
            "input_len": self.input_len, "requested_output_len": self.requested_output_len,
            "output_tokens": self.output_tokens, "start_s": self.start, "end_s": self.end,
            "ttft_s": self.ttft if self.success else None,
            "e2el_s": self.latency if self.success else None, "tpot_s": self.tpot,
            "itl_s": self.itl,
        }


@dataclass
class LoadTestResult:
    metrics: dict[str, float]  # vLLM's keys: completed, duration, mean_ttft_ms, ...
    errors: dict[str, int]  # failed requests by gRPC status code name
    requests: list[RequestRecord]  # the measured ones (warm-up excluded), in sending order
    sent: int
    max_in_flight: int  # most requests in flight at once, as seen by the load generator
    start_time: str  # ISO 8601, UTC
    stopped_by: str  # "num_requests", "duration" or "interrupt" (Ctrl-C)
    warmup_failed: int = 0
    model_info: dict[str, Any] = field(default_factory=dict)  # the server's ModelInfo
    server_memory: dict[str, float | None] = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return sum(r.success for r in self.requests)

    @property
    def failed(self) -> int:
        return sum(not r.success for r in self.requests)
