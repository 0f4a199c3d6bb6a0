"""run_load_test: check the server, warm up, run the measured phase, compute the metrics."""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
import threading
import time

from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.environment import MemoryWatch, default_metrics_url
from ecserve.loadtest.progress import Progress
from ecserve.loadtest.records import LoadTestResult
from ecserve.loadtest.runner import Phase
from ecserve.loadtest.stats import calculate_metrics, errors_by_code
from ecserve.loadtest.transport import transport
from ecserve.loadtest.workload import build_workload
from ecserve.security import ClientSecurity


def run_load_test(cfg: LoadTestConfig, progress: bool | None = None,
                  security: ClientSecurity | None = None) -> LoadTestResult:
    """Run `cfg` to the end in an event loop of its own (uvloop when installed).

    Raises ConfigError for a bad config (or lengths past the server's max_model_len) and
    ServerUnreachable when the server does not answer ModelInfo within cfg.connect_timeout.
    `progress`: draw the progress bar on stderr (default: cfg.progress, else when stderr is
    a terminal). A first Ctrl-C during the measured phase ends it (result.stopped_by
    "interrupt": the report covers what was measured); earlier, or a second time, it is a
    KeyboardInterrupt. `security`: TLS and
    the API key (kept out of cfg, which the JSON report records)."""
    cfg.validate()
    show = progress if progress is not None else (
        cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(cfg, show, security or ClientSecurity()))
    return uvloop.run(_main(cfg, show, security or ClientSecurity()))


async def _main(cfg: LoadTestConfig, show: bool, security: ClientSecurity) -> LoadTestResult:
    loop = asyncio.get_running_loop()
    measured: list[Phase] = []  # the measured phase, once it runs
    task = asyncio.ensure_future(_measure(cfg, show, security, measured))

    def on_interrupt() -> None:
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C: Python's own
        if measured:
            measured[0].interrupt()
        else:
            task.cancel()

    handled = threading.current_thread() is threading.main_thread()
    if handled:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await task
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


async def _measure(cfg: LoadTestConfig, show: bool, security: ClientSecurity,
                   measured: list[Phase]) -> LoadTestResult:
    link = transport(cfg, security)
    try:
        limits, info = await link.model_info(cfg.connect_timeout)
        specs = build_workload(cfg, limits, cfg.warmup_requests + cfg.num_requests)
        warm, specs = specs[:cfg.warmup_requests], specs[cfg.warmup_requests:]
        warmup_failed = 0
        if warm:
            bar = _bar(show, len(warm), "warmup")
            phase = Phase(link, cfg, warm, bar, time.perf_counter() + cfg.duration)
            await phase.run(open_loop=False, workers=1 if cfg.open_loop else cfg.workers)
            warmup_failed = phase.failed
            _close(bar, phase)

        url = cfg_metrics_url(cfg)
        watch = MemoryWatch(url)
        await asyncio.to_thread(watch.sample)
        sampler = asyncio.ensure_future(_sample_every(watch, 1.0))
        start_time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        bar = _bar(show, len(specs), "bench")
        phase = Phase(link, cfg, specs, bar, time.perf_counter() + cfg.duration)
        measured.append(phase)
        try:
            await phase.run(cfg.open_loop, cfg.workers)
        finally:
            _close(bar, phase)
            sampler.cancel()
        duration = max((r.end for r in phase.records), default=time.perf_counter() - phase.t0)
        await asyncio.to_thread(watch.sample)
    finally:
        await link.close()

    return LoadTestResult(
        metrics={**calculate_metrics(phase.records, duration, cfg.goodput),
                 "max_in_flight": phase.max_in_flight},
        errors=errors_by_code(phase.records), requests=phase.records, sent=len(phase.records),
        max_in_flight=phase.max_in_flight, start_time=start_time, stopped_by=phase.stopped_by,
        warmup_failed=warmup_failed,
        model_info=info,
        server_memory=watch.summary(),
    )


def cfg_metrics_url(cfg: LoadTestConfig) -> str | None:
    """cfg.metrics_url; None: http://HOST:9400/metrics; "": do not scrape."""
    if cfg.metrics_url is None:
        return default_metrics_url(cfg.address)
    return cfg.metrics_url or None


async def _sample_every(watch: MemoryWatch, seconds: float) -> None:
    while watch.reachable:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(watch.sample)


def _bar(show: bool, total: int, label: str) -> Progress | None:
    return Progress(total, label, sys.stderr) if show else None


def _close(bar: Progress | None, phase: Phase) -> None:
    if bar is not None:
        bar.update(phase.done, phase.failed, phase.in_flight, force=True)
        bar.close()

