"""What a load test does: LoadTestConfig, named like `ecserve bench`'s flags, and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ecserve.config import SCOPES, Scope
from ecserve.config.fields import flag
from ecserve.errors import ConfigError
from ecserve.security import DEFAULT_ADDRESS

Protocol = Literal["grpc", "http"]
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8000"
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
SLO_NAMES = ("ttft", "tpot", "e2el")  # goodput SLOs, in ms, as vLLM's --goodput
LATENCIES = ("ttft", "tpot", "itl", "e2el")  # the latency metrics, in report order


def parse_slo(item: str) -> tuple[str, float]:
    """`"ttft:500"` -> ("ttft", 500.0) (milliseconds)."""
    name, sep, value = item.partition(":")
    try:
        if sep:
            return name.strip(), float(value)
    except ValueError:
        pass
    raise ConfigError(f"--goodput: expected NAME:MS (e.g. ttft:500), got {item!r}",
                      field="goodput")


@dataclass
class LoadTestConfig:
    """One run. Closed loop (`concurrency` workers) or open loop (`request_rate`), not both;
    neither: a closed loop of one worker. Lengths: fixed, uniform ranges, or a prompts file."""

    address: str = DEFAULT_ADDRESS
    """The server's gRPC address; with --protocol http, its HTTP API's (default there:
    127.0.0.1:8000)."""
    protocol: Protocol = "grpc"
    """grpc: GenerateStream calls; http: streamed /v1/completions of the OpenAI-compatible API
    (the same workload, so the two compare)."""
    concurrency: int | None = field(default=None, metadata=flag(metavar="N"))
    """Closed loop: N workers, each sending when its last request ends (default: 1)."""
    request_rate: float | None = field(default=None, metadata=flag(metavar="R"))
    """Open loop: requests/s with gamma-distributed gaps; inf sends everything at once."""
    burstiness: float = field(default=1.0, metadata=flag(metavar="B"))
    """Gamma shape of the open loop's gaps: 1 is Poisson, below 1 burstier."""
    num_requests: int = field(default=100, metadata=flag(metavar="N"))
    """Requests to send."""
    duration: float = field(default=600.0, metadata=flag(metavar="S"))
    """Stop sending after this many seconds, whatever num_requests says."""
    drain_timeout: float = field(default=30.0, metadata=flag(metavar="S"))
    """Seconds in-flight requests get after sending stops; then they are cancelled and counted
    as failed."""
    input_len: int | None = field(default=None, metadata=flag(
        metavar="N", default_text=str(DEFAULT_INPUT_LEN)))
    """Prompt tokens of every request."""
    output_len: int | None = field(default=None, metadata=flag(
        metavar="N", default_text=str(DEFAULT_OUTPUT_LEN)))
    """Generated tokens of every request (EOS ignored)."""
    input_len_range: tuple[int, int] | None = field(default=None, metadata=flag(
        nargs=2, metavar=("LO", "HI")))
    """Prompt lengths drawn uniformly from [LO, HI]."""
    output_len_range: tuple[int, int] | None = field(default=None, metadata=flag(
        nargs=2, metavar=("LO", "HI")))
    """Output lengths drawn uniformly from [LO, HI]."""
    prompts_file: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """JSONL lines {"prompt": ..., "max_new_tokens": N}, or one text prompt a line."""
    shared_prefix_len: int = field(default=0, metadata=flag(metavar="N"))
    """Synthetic prompts start with one of --num-prefixes shared prefixes of N tokens, then
    their own input_len tokens (a system prompt, few-shot examples); 0: none."""
    num_prefixes: int = field(default=1, metadata=flag(metavar="N"))
    """Distinct shared prefixes, taken by the requests in turn."""
    warmup_requests: int = field(default=0, metadata=flag(metavar="N"))
    """Requests sent first and not measured."""
    max_in_flight: int = field(default=1024, metadata=flag(metavar="N"))
    """Most requests in flight; the open loop waits past it."""
    timeout: float | None = field(default=None, metadata=flag(metavar="S"))
    """Per-request deadline in seconds."""
    connect_timeout: float = 5.0
    """Seconds the first call (ModelInfo, checking the server is there) may take."""
    seed: int = field(default=0, metadata=flag(metavar="N"))
    """Seeds the lengths, the prompts and the arrivals."""
    temperature: float = field(default=0.0, metadata=flag(metavar="T"))
    """0: greedy; a sampled request i has the seed seed + i."""
    routing_scope: Scope | None = None
    """The requests' routing scope; default: the model's."""
    metrics_url: str | None = field(default=None, metadata=flag(metavar="URL"))
    """The server's Prometheus endpoint, read for its memory; default: http://HOST:9400/metrics
    of the address's host; "" skips it."""
    goodput: dict[str, float] = field(default_factory=dict, metadata=flag(
        nargs="+", metavar="NAME:MS", parse=parse_slo))
    """SLOs for goodput, in ms: ttft, tpot and e2el (e.g. ttft:500 tpot:50)."""
    progress: bool | None = None
    """Draw a progress bar on standard error; default: when it is a terminal."""

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

    def target(self) -> str:
        """The HOST:PORT the requests go to."""
        if self.protocol == "http" and self.address == DEFAULT_ADDRESS:
            return DEFAULT_HTTP_ADDRESS
        return self.address

    def validate(self) -> None:
        """ConfigError naming the flag of the first bad field."""
        if self.concurrency is not None and self.request_rate is not None:
            raise _error("request_rate", "give --concurrency (closed loop) or --request-rate "
                         "(open loop), not both")
        for name in ("concurrency", "input_len", "output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _error(name, f"{_flag(name)} must be >= 1, got {value}")
        for name in ("num_requests", "max_in_flight"):
            if getattr(self, name) < 1:
                raise _error(name, f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0:
            raise _error("warmup_requests",
                         f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        for name in ("duration", "burstiness", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise _error(name, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.drain_timeout < 0:
            raise _error("drain_timeout", f"--drain-timeout must be >= 0, got "
                         f"{self.drain_timeout}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise _error("request_rate", f"--request-rate must be > 0 (or inf), got "
                         f"{self.request_rate}")
        if self.timeout is not None and not self.timeout > 0:
            raise _error("timeout", f"--timeout must be > 0, got {self.timeout}")
        if self.temperature < 0 or math.isnan(self.temperature):
            raise _error("temperature", f"--temperature must be >= 0, got {self.temperature}")
        for name in ("input_len_range", "output_len_range"):
            rng = getattr(self, name)
            if rng is not None and not 1 <= rng[0] <= rng[1]:
                raise _error(name, f"{_flag(name)} needs 1 <= LO <= HI, got {rng[0]} {rng[1]}")
        for name, fixed in (("input_len", self.input_len), ("output_len", self.output_len)):
            if fixed is not None and getattr(self, name + "_range") is not None:
                raise _error(name, f"give {_flag(name)} or {_flag(name + '_range')}, not both")
        if self.prompts_file is not None and (self.input_len is not None
                                              or self.input_len_range is not None):
            raise _error("prompts_file", "--prompts-file sets the inputs: drop "
                         "--input-len/--input-len-range")
        if self.shared_prefix_len < 0 or self.num_prefixes < 1:
            name = "shared_prefix_len" if self.shared_prefix_len < 0 else "num_prefixes"
            raise _error(name, f"{_flag(name)} must be >= {0 if name[0] == 's' else 1}, got "
                         f"{getattr(self, name)}")
        if self.prompts_file is not None and self.shared_prefix_len:
            raise _error("shared_prefix_len", "--shared-prefix-len builds synthetic prompts: "
                         "drop --prompts-file")
        if self.routing_scope not in (None, *SCOPES):
            raise _error("routing_scope", f"--routing-scope must be batch or sequence, got "
                         f"{self.routing_scope!r}")
        for name, ms in self.goodput.items():
            if name not in SLO_NAMES:
                raise _error("goodput", f"--goodput: unknown SLO {name!r} (known: "
                             f"{', '.join(SLO_NAMES)})")
            if not ms > 0:
                raise _error("goodput", f"--goodput: {name} must be > 0 ms, got {ms}")


def parse_slos(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    return dict(map(parse_slo, items))


def _error(name: str, message: str) -> ConfigError:
    return ConfigError(message, field=name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
