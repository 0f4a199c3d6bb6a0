"""Where a run happened: the load generator's machine, and the server's memory from its
Prometheus endpoint (best effort: an unreachable endpoint gives nulls, never a failure)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

MEMORY_SERIES = {
    "rss_bytes": "process_resident_memory_bytes",
    "peak_rss_bytes": "ecserve_process_peak_rss_bytes",
    "device_memory_peak_bytes": "ecserve_device_memory_peak_bytes",
}


def default_metrics_url(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return f"http://{host or '127.0.0.1'}:9400/metrics"


def scrape_memory(url: str, timeout: float = 2.0) -> dict[str, float | None] | None:
    """The memory series found at `url` (None for those missing); None if unreachable."""
    from ecserve.top import ScrapeError, scrape

    try:
        snap = scrape(url, timeout=timeout)
    except ScrapeError:
        return None
    except Exception:  # a scrape must never fail the run
        return None
    return {key: snap.total(name) for key, name in MEMORY_SERIES.items()}


class MemoryWatch:
    """Scrapes now and then during a run and keeps the largest values seen."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.reachable = bool(url)
        self.peak: dict[str, float | None] = dict.fromkeys(MEMORY_SERIES)
        self.last: dict[str, float | None] = dict.fromkeys(MEMORY_SERIES)

    def sample(self) -> None:
        if not self.reachable or self.url is None:
            return
        found = scrape_memory(self.url)
        if found is None:
            self.reachable = False
            return
        self.last = found
        for key, value in found.items():
            if value is not None:
                old = self.peak[key]
                self.peak[key] = value if old is None else max(old, value)

    def summary(self) -> dict[str, Any]:
        """Peaks over the run (rss: the largest sampled; the peak series: the server's own)."""
        return {
            "metrics_url": self.url,
            "reachable": self.reachable and any(v is not None for v in self.last.values()),
            "rss_bytes_end": self.last["rss_bytes"],
            "rss_bytes_max_sampled": self.peak["rss_bytes"],
            "peak_rss_bytes": self.peak["peak_rss_bytes"],
            "device_memory_peak_bytes": self.peak["device_memory_peak_bytes"],
        }


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict[str, Any]:
    import grpc

    import ecserve

    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
        "python": platform.python_version(), "grpcio": grpc.__version__,
        "ecserve": ecserve.__version__, "event_loop": _loop_name(),
        "argv": sys.argv,
    }


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
