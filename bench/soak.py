"""Soak: a server held at twice its capacity for a while, by clients that misbehave.

    python bench/soak.py [--duration 600] [--model DIR] [--json PATH]
        [--shared-prefix-len 48] [--num-prefixes 8]

Starts `ecserve serve` (engine core in its own process) on loopback, measures its capacity
(completed requests/s of a closed loop at 32 streams), then sends an open loop at twice that
rate for --duration seconds. Each prompt is one of --num-prefixes shared prefixes followed by
--prompt-len random tokens, so the prefix cache (on by default) hits, fills and evicts
throughout. Each request is, at random: read to its end (55%), cancelled by
the client after a few tokens (15%), given a deadline it may miss (15%), or read slowly, 50 ms
between messages (15%). In-flight requests are capped (--max-in-flight); past it an arrival is
skipped and counted. At the end, with the load stopped and every call settled: the calls per
gRPC status, the scraped KV blocks in use (must be 0: prefix-cached blocks stay, evictable),
requests running (0), prefix cache hits (must be some) and preemptions, the resident
memory of both server processes against a sample taken after the first tenth of the run, then
SIGTERM and the server's exit code (0). Exits 1 when any check fails: an INTERNAL or UNKNOWN
status, KV blocks left in use, no prefix cache hit, or a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from provenance import stamp

from ecserve.client import Client, build_request
from ecserve.parallel.group import free_port
from ecserve.v1 import generation_pb2_grpc as pb_grpc

MIX = (("complete", 0.55), ("cancel", 0.15), ("deadline", 0.15), ("slow", 0.15))
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def start_server(port: int, metrics_port: int, model: str | None, log: Path
                 ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ecserve", "serve", "--port", str(port), "--metrics-port",
           str(metrics_port), "--http-port", "0", "--log-level", "WARNING",
           *(["--model", model] if model else [])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    end = time.monotonic() + 180
    with Client(f"127.0.0.1:{port}", timeout=2) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    return proc
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise SystemExit(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    names = ("ecserve_kv_cache_blocks_used", "ecserve_kv_cache_capacity_blocks",
             "ecserve_kv_cache_blocks_cached", "ecserve_kv_cache_blocks_evictable",
             "ecserve_prefix_cache_queries_total", "ecserve_prefix_cache_hits_total",
             "ecserve_preemptions_total", "ecserve_requests_running", "ecserve_requests_waiting",
             "process_resident_memory_bytes", "ecserve_engine_core_process_resident_memory_bytes")
    out = {}
    for name in names:  # summed over any labels
        values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if values:
            out[name] = sum(float(v) for v in values)
    return out


class Load:
    def __init__(self, address: str, prompt_len: int, output_len: int, seed: int,
                 prefixes: int, prefix_len: int) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.rng = random.Random(seed)
        self.prompt_len, self.output_len = prompt_len, output_len
        self.prefixes = [[self.rng.randrange(1, 250) for _ in range(prefix_len)]
                         for _ in range(prefixes)] or [[]]
        self.statuses: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.live: set[asyncio.Task[None]] = set()

    def request(self):
        prompt = [*self.rng.choice(self.prefixes),
                  *(self.rng.randrange(1, 250) for _ in range(self.prompt_len))]
        return build_request(prompt, max_new_tokens=self.output_len, ignore_eos=True)

    async def one(self, kind: str) -> None:
        timeout = self.rng.uniform(0.05, 2.0) if kind == "deadline" else 120
        call = self.stub.GenerateStream(self.request(), timeout=timeout)
        stop_after = self.rng.randrange(1, self.output_len) if kind == "cancel" else None
        tokens = 0
        try:
            async for msg in call:
                tokens = msg.generated_token_count
                if stop_after is not None and tokens >= stop_after:
                    call.cancel()
                    self.statuses["CANCELLED"] += 1
                    return
                if kind == "slow":
                    await asyncio.sleep(0.05)
            self.statuses["OK"] += 1
        except grpc.aio.AioRpcError as e:
            self.statuses[e.code().name] += 1
        except asyncio.CancelledError:
            self.statuses["CANCELLED"] += 1

    def launch(self, kind: str) -> None:
        self.kinds[kind] += 1
        task = asyncio.ensure_future(self.one(kind))
        self.live.add(task)
        task.add_done_callback(self.live.discard)

    async def capacity(self, seconds: float, streams: int) -> float:
        """Completed requests/s of a closed loop of `streams` full reads."""
        done, end = 0, time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async for _ in self.stub.GenerateStream(self.request(), timeout=120):
                    pass
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return done / (time.perf_counter() - t0)

    async def open_loop(self, rate: float, seconds: float, max_in_flight: int,
                        at_tenth: asyncio.Event) -> int:
        kinds, weights = zip(*MIX, strict=True)
        t0 = time.perf_counter()
        skipped, next_at = 0, t0
        while (now := time.perf_counter()) < t0 + seconds:
            if now - t0 >= seconds / 10:
                at_tenth.set()
            if now < next_at:
                await asyncio.sleep(next_at - now)
                continue
            next_at += self.rng.expovariate(rate)
            if len(self.live) >= max_in_flight:
                skipped += 1
                continue
            self.launch(self.rng.choices(kinds, weights)[0])
        return skipped


async def run(args: argparse.Namespace, port: int, metrics_port: int) -> dict[str, object]:
    load = Load(f"127.0.0.1:{port}", args.prompt_len, args.output_len, args.seed,
                args.num_prefixes, args.shared_prefix_len)
    capacity = args.rate / 2 if args.rate else await load.capacity(5.0, 32)
    rate = args.rate or 2 * capacity
    print(f"capacity {capacity:.1f} req/s; sending {rate:.1f} req/s for {args.duration:.0f} s",
          flush=True)
    tenth = asyncio.Event()
    early: dict[str, float] = {}

    async def sample() -> None:
        await tenth.wait()
        early.update(await asyncio.to_thread(scrape, metrics_port))

    sampler = asyncio.ensure_future(sample())
    skipped = await load.open_loop(rate, args.duration, args.max_in_flight, tenth)
    settle_start = time.perf_counter()
    if load.live:
        await asyncio.wait(load.live, timeout=180)
    await sampler
    settle = time.perf_counter() - settle_start
    await asyncio.sleep(0.5)  # the last aborts reach the engine core
    late = await asyncio.to_thread(scrape, metrics_port)
    await load.channel.close()
    return {"capacity_req_s": capacity, "rate_req_s": rate, "sent": dict(load.kinds),
            "skipped_at_max_in_flight": skipped, "statuses": dict(load.statuses),
            "settle_seconds": settle, "metrics_at_a_tenth": early, "metrics_at_end": late}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("--rate", type=float, help="requests/s (default: twice the measured "
                                                   "capacity)")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="random tokens after the shared prefix")
    parser.add_argument("--shared-prefix-len", type=int, default=48)
    parser.add_argument("--num-prefixes", type=int, default=8, help="0: no shared prefix")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    # The server runs in a session of its own: a soak stopped by SIGTERM still stops it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    port, metrics_port = free_port(), free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ecserve-soak-{port}.log"
    server = start_server(port, metrics_port, args.model, log)
    try:
        report = asyncio.run(run(args, port, metrics_port))
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    end, early = report["metrics_at_end"], report["metrics_at_a_tenth"]
    rss = {name: {"at_a_tenth": early.get(name), "at_end": end.get(name)} for name in
           ("process_resident_memory_bytes", "ecserve_engine_core_process_resident_memory_bytes")}
    unexpected = {k: v for k, v in report["statuses"].items() if k not in EXPECTED}
    checks = {
        "no INTERNAL or UNKNOWN": not {"INTERNAL", "UNKNOWN"} & set(unexpected),
        "no other unexpected status": not unexpected,
        # Prefix-cached blocks stay (evictable) after their requests: none may stay in use.
        "every KV block free or evictable": end.get("ecserve_kv_cache_blocks_used") == 0.0,
        "no request running or waiting": end.get("ecserve_requests_running") == 0.0
        and end.get("ecserve_requests_waiting") == 0.0,
        **({"prefix cache hits": end.get("ecserve_prefix_cache_hits_total", 0) > 0}
           if args.num_prefixes and args.shared_prefix_len else {}),
        "SIGTERM exit 0": code == 0,
    }
    report = {**stamp(__file__, packages=("grpcio",)), **report, "rss": rss,
              "server_exit_code": code, "checks": checks, "config": vars(args)}
    print(json.dumps({k: report[k] for k in ("sent", "statuses", "skipped_at_max_in_flight",
                                             "rss", "checks")}, indent=1))
    for name, v in rss.items():
        if v["at_a_tenth"] and v["at_end"]:
            print(f"{name}: {v['at_a_tenth'] / 2**20:.0f} MiB -> {v['at_end'] / 2**20:.0f} MiB "
                  f"({v['at_end'] / v['at_a_tenth'] - 1:+.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [k for k, ok in checks.items() if not ok]
    print("soak:", "passed" if not failed else f"FAILED: {', '.join(failed)}")
    if failed:
        print(f"server log: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
