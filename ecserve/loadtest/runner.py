"""The load generator: streams in a closed or open loop, one record per request, over a
Transport (gRPC or the HTTP API)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.progress import Progress
from ecserve.loadtest.records import RequestRecord
from ecserve.loadtest.transport import FAILED_STOPS, CallFailed, Transport
from ecserve.loadtest.workload import RequestSpec, arrival_offsets


class Phase:
    """Sends one list of requests (the warm-up, or the measured run) and records them."""

    def __init__(self, transport: Transport, cfg: LoadTestConfig, specs: Sequence[RequestSpec],
                 progress: Progress | None, stop_at: float) -> None:
        self.transport, self.cfg, self.specs, self.progress = transport, cfg, specs, progress
        self.stop_at = stop_at  # perf_counter time after which nothing more is sent
        self.t0 = time.perf_counter()
        self.records: list[RequestRecord] = []
        self.live: set[asyncio.Task[None]] = set()
        self.task_records: dict[asyncio.Task[None], RequestRecord] = {}
        self.slots = asyncio.Semaphore(cfg.max_in_flight)
        self.in_flight = self.max_in_flight = self.done = self.failed = 0
        self.stopped_by = "num_requests"
        self.all_sent = asyncio.Event()
        self.interrupted = asyncio.Event()  # Ctrl-C: stop sending, cancel what is in flight

    def _may_send(self) -> bool:
        if len(self.records) >= len(self.specs) or self.interrupted.is_set():
            return False
        if time.perf_counter() >= self.stop_at:
            self.stopped_by = "duration"
            self.all_sent.set()
            return False
        return True

    def _launch(self) -> asyncio.Task[None]:
        """Send the next request now (the caller holds a slot, released when it ends)."""
        i = len(self.records)
        spec = self.specs[i]
        rec = RequestRecord(i, spec.input_len, spec.output_len)
        self.records.append(rec)
        task = asyncio.ensure_future(self._request(spec, rec))
        self.live.add(task)
        self.task_records[task] = rec
        task.add_done_callback(self.live.discard)
        if len(self.records) == len(self.specs):
            self.all_sent.set()
        return task

    async def _request(self, spec: RequestSpec, rec: RequestRecord) -> None:
        st = time.perf_counter()
        rec.start = st - self.t0
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        count, last = 0, st
        try:
            async for chunk in self.transport.stream(spec, self.cfg, rec.index):
                now = time.perf_counter()
                if chunk.input_tokens:
                    rec.input_len = chunk.input_tokens
                if chunk.stop_reason:
                    rec.stop_reason = chunk.stop_reason
                new = chunk.generated - count
                if new > 0:
                    if count == 0:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    last, count = now, chunk.generated
                    rec.chunk_times.append(now - self.t0)
                    rec.chunk_tokens.append(new)
            rec.output_tokens, rec.latency = count, last - st
            if rec.stop_reason in FAILED_STOPS or count == 0:
                rec.error = rec.stop_reason or "NO_TOKENS"
            else:
                rec.success = True
        except CallFailed as e:
            rec.error, rec.detail = e.code, e.detail
        except asyncio.CancelledError:  # the stream's own cleanup cancelled the call
            if not rec.cancelled_by_us:
                raise
            rec.error, rec.detail = "CANCELLED", ("cancelled by an interrupt (Ctrl-C)"
                                                  if self.interrupted.is_set() else
                                                  "still running when the drain timeout ran out")
        except Exception as e:  # anything else still counts, so sent = succeeded + failed
            rec.error, rec.detail = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
        finally:
            rec.end = time.perf_counter() - self.t0
            self.in_flight -= 1
            self.done += 1
            self.failed += not rec.success
            self.slots.release()
            if self.progress is not None:
                self.progress.update(self.done, self.failed, self.in_flight)

    async def _closed_worker(self) -> None:
        while True:
            await self.slots.acquire()
            if not self._may_send():
                self.slots.release()
                return
            await self._launch()

    async def _open_issuer(self) -> None:
        rate = self.cfg.request_rate
        assert rate is not None
        for offset in arrival_offsets(rate, self.cfg.burstiness, self.cfg.seed):
            delay = self.t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(min(delay, max(self.stop_at - time.perf_counter(), 0)))
            await self.slots.acquire()  # --max-in-flight: wait for a request to end
            if not self._may_send():
                self.slots.release()
                return
            self._launch()

    def interrupt(self) -> None:
        """Ctrl-C: send nothing more and cancel what is in flight (counted failed,
        CANCELLED), so the run ends at once and reports what it measured."""
        self.stopped_by = "interrupt"
        self.stop_at = time.perf_counter()
        self.interrupted.set()
        self.all_sent.set()

    async def run(self, open_loop: bool, workers: int) -> None:
        self.t0 = time.perf_counter()
        if open_loop:
            senders = [asyncio.ensure_future(self._open_issuer())]
        else:
            senders = [asyncio.ensure_future(self._closed_worker()) for _ in range(workers)]
        try:
            await asyncio.wait_for(self.all_sent.wait(), self.stop_at - time.perf_counter())
        except asyncio.TimeoutError:
            self.stopped_by = "duration"
        self.stop_at = min(self.stop_at, time.perf_counter())  # senders send nothing more
        if self.live and not self.interrupted.is_set():
            drained = asyncio.ensure_future(asyncio.wait(set(self.live)))
            stop = asyncio.ensure_future(self.interrupted.wait())
            await asyncio.wait({drained, stop}, timeout=self.cfg.drain_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            stop.cancel()
        for task in list(self.live):
            self.task_records[task].cancelled_by_us = True
            task.cancel()
        if self.live:
            await asyncio.wait(set(self.live))
        for s in senders:  # every request has ended, so no sender is awaiting one
            s.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for rec in self.records:  # cancelled before its first step: never sent a byte
            if not rec.success and rec.error is None:
                rec.error, rec.detail = "CANCELLED", "cancelled before it started"
                rec.end = time.perf_counter() - self.t0
