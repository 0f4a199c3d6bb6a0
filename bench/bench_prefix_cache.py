"""Prefix caching on a shared-prefix workload: one server with it (the default), one with
`--no-prefix-caching`, loaded in turn by `ecserve bench`'s closed loop.

    python bench/bench_prefix_cache.py [--json PATH] [--rounds 3] [--requests 32]
        [--prefix-len 384] [--suffix-len 32] [--output-len 32] [--concurrency 8]

Every request is one shared prefix of --prefix-len token ids followed by --suffix-len of its
own, and asks for --output-len tokens (EOS ignored), on the default model, the engine core in
its own process. One warm-up request per run first (it computes the prefix, as a system prompt's
first user would); the order of the two servers alternates each round; only the server being
loaded has work. Reports the medians over rounds of output tok/s and TTFT p50, the ratios
(cached / uncached: the issue's goals are TTFT p50 <= 0.3 and tok/s >= 2), and the cached
server's prefix cache hits over queries in tokens, read from its /metrics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from provenance import stamp

from ecserve.client import Client
from ecserve.loadtest import LoadTestConfig, run_load_test
from ecserve.parallel.group import free_port

VARIANTS = {"cached": [], "uncached": ["--no-prefix-caching"]}


def start_server(args: list[str]) -> tuple[subprocess.Popen[bytes], str, int]:
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ecserve", "serve", "--port", str(port),
                             "--metrics-port", str(metrics), "--no-http", "--log-level",
                             "WARNING", *args])
    address = f"127.0.0.1:{port}"
    end = time.monotonic() + 300  # the compiled decode step compiles at start
    with Client(address, timeout=2) as c:
        while time.monotonic() < end and proc.poll() is None:
            try:
                if c.health() == "SERVING":
                    return proc, address, metrics
            except Exception:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def counter(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=384)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args(argv)
    servers = {name: start_server(args) for name, args in VARIANTS.items()}
    tok_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ttft: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for r in range(a.rounds):
            for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                _, address, _ = servers[name]
                cfg = LoadTestConfig(
                    address=address, metrics_url="", concurrency=a.concurrency,
                    num_requests=a.requests, warmup_requests=1, input_len=a.suffix_len,
                    output_len=a.output_len, shared_prefix_len=a.prefix_len, seed=r,
                    progress=False)
                result = run_load_test(cfg)
                m = result.metrics
                if m["failed"]:
                    raise SystemExit(f"{name}: {m['failed']} requests failed: {result.errors}")
                tok_s[name].append(m["output_throughput"])
                ttft[name].append(m["median_ttft_ms"])
                print(f"round {r + 1}: {name}: {m['output_throughput']:,.0f} output tok/s, "
                      f"TTFT p50 {m['median_ttft_ms']:.1f} ms", flush=True)
        metrics_port = servers["cached"][2]
        hits = counter(metrics_port, "ecserve_prefix_cache_hits_total")
        queries = counter(metrics_port, "ecserve_prefix_cache_queries_total")
        uncached_queries = counter(servers["uncached"][2], "ecserve_prefix_cache_queries_total")
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    med_tok = {v: statistics.median(x) for v, x in tok_s.items()}
    med_ttft = {v: statistics.median(x) for v, x in ttft.items()}
    summary = {"output_tok_s": med_tok, "ttft_p50_ms": med_ttft,
               "ttft_p50_cached_over_uncached": med_ttft["cached"] / med_ttft["uncached"],
               "tok_s_cached_over_uncached": med_tok["cached"] / med_tok["uncached"],
               "hit_rate_tokens": hits / queries if queries else 0.0,
               "uncached_server_queries": uncached_queries}
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps({
            **stamp(__file__, argv),
            "config": {"rounds": a.rounds, "requests": a.requests, "prefix_len": a.prefix_len,
                       "suffix_len": a.suffix_len, "output_len": a.output_len,
                       "concurrency": a.concurrency, "warmup_requests": 1},
            "rounds": {"output_tok_s": tok_s, "ttft_p50_ms": ttft}, "summary": summary,
            "goals": {"ttft_p50_cached_over_uncached": "<= 0.3",
                      "tok_s_cached_over_uncached": ">= 2"}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
