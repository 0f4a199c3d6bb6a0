"""Watch a server's Prometheus endpoint in the terminal: requests, KV blocks, latencies, and a
row per MoE layer and expert (utilisation, gate, compute time, tokens/s). Ctrl-C quits."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config import ServerConfig
from ecserve.config.fields import flag

HELP = "watch a server's /metrics: per-expert table, latencies"


@dataclass(frozen=True)
class TopOptions:
    url: str = f"http://127.0.0.1:{ServerConfig.metrics_port}/metrics"
    """The server's metrics endpoint."""
    interval: float = field(default=2.0, metadata=flag(metavar="S"))
    """Seconds between scrapes."""
    iterations: int | None = field(default=None, metadata=flag(metavar="N"))
    """Scrapes before exiting; default: until Ctrl-C."""
    once: bool = False
    """Print one snapshot and exit."""
    timeout: float = field(default=5.0, metadata=flag(metavar="S"))
    """Seconds per scrape."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TopOptions)


def run(args: argparse.Namespace) -> int:
    from ecserve.top import ScrapeError
    from ecserve.top import run as watch

    opts = from_flags(TopOptions, args)
    try:
        return watch(opts.url, opts.interval, 1 if opts.once else opts.iterations,
                     timeout=opts.timeout)
    except ScrapeError as e:  # the server is down: 1, as `health` says for it
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 1
