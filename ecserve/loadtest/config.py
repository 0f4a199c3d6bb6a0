"""What a load test does: LoadTestConfig, named like `ecserve bench`'s flags, and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
SLO_NAMES = ("ttft", "tpot", "e2el")  # goodput SLOs, in ms, as vLLM's --goodput
LATENCIES = ("ttft", "tpot", "itl", "e2el")  # the latency metrics, in report order


@dataclass
class LoadTestConfig:
    """One run. Closed loop (`concurrency` workers) or open loop (`request_rate`), not both;
    neither: a closed loop of one worker. Lengths: fixed, uniform ranges, or a prompts file."""

    address: str = "127.0.0.1:50051"
    concurrency: int | None = None
    request_rate: float | None = None  # req/s; math.inf sends everything at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival times; 1: Poisson
    num_requests: int = 100
    duration: float = 600.0  # seconds: stop issuing then, whatever num_requests says
    drain_timeout: float = 30.0  # seconds in-flight requests get after issuing stops
    input_len: int | None = None  # None: DEFAULT_INPUT_LEN
    output_len: int | None = None  # None: DEFAULT_OUTPUT_LEN
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    prompts_file: str | None = None
    warmup_requests: int = 0
    max_in_flight: int = 1024
    timeout: float | None = None  # per-request deadline in seconds
    connect_timeout: float = 5.0  # the ModelInfo call that checks the server is there
    seed: int = 0
    temperature: float = 0.0
    routing_scope: str | None = None  # batch | sequence; None: the model's
    metrics_url: str | None = None  # server's /metrics for memory; None: HOST:9400; "": skip
    goodput: dict[str, float] = field(default_factory=dict)  # SLO name -> ms
    progress: bool = False

    @property
    def open_loop(self) -> bool:
        return self.request_rate is not None

    @property
    def workers(self) -> int:
        """Closed-loop workers (1 when neither mode was given)."""
        return self.concurrency if self.concurrency is not None else 1

    def lengths(self) -> tuple[int, int]:
        """The fixed (input, output) lengths in force."""
        return (self.input_len if self.input_len is not None else DEFAULT_INPUT_LEN,
                self.output_len if self.output_len is not None else DEFAULT_OUTPUT_LEN)

    def validate(self) -> None:
        """ValueError naming the flag of the first bad field."""
        if self.concurrency is not None and self.request_rate is not None:
            raise ValueError("give --concurrency (closed loop) or --request-rate (open loop), "
                             "not both")
        for name in ("concurrency", "input_len", "output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {value}")
        for name in ("num_requests", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0:
            raise ValueError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        for name in ("duration", "burstiness", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout}")
        if self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        for name in ("input_len_range", "output_len_range"):
            rng = getattr(self, name)
            if rng is not None and not 1 <= rng[0] <= rng[1]:
                raise ValueError(f"{_flag(name)} needs 1 <= LO <= HI, got {rng[0]} {rng[1]}")
        for name, fixed in (("input_len", self.input_len), ("output_len", self.output_len)):
            if fixed is not None and getattr(self, name + "_range") is not None:
                raise ValueError(f"give {_flag(name)} or {_flag(name + '_range')}, not both")
        if self.prompts_file is not None and (self.input_len is not None
                                              or self.input_len_range is not None):
            raise ValueError("--prompts-file sets the inputs: drop --input-len/--input-len-range")
        if self.routing_scope not in (None, "batch", "sequence"):
            raise ValueError(f"--routing-scope must be batch or sequence, got "
                             f"{self.routing_scope!r}")
        for name, ms in self.goodput.items():
            if name not in SLO_NAMES:
                raise ValueError(f"--goodput: unknown SLO {name!r} (known: {', '.join(SLO_NAMES)})")
            if not ms > 0:
                raise ValueError(f"--goodput: {name} must be > 0 ms, got {ms}")


def parse_slos(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--goodput: expected NAME:MS (e.g. ttft:500), got {item!r}")
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
