"""The OpenAI-compatible HTTP API against gRPC on one server, and guidellm against `ecserve
bench --protocol http` on one workload.

    python bench/bench_http_api.py [--json PATH] [--rounds 3] [--output-len 64]
        [--guidellm] [--guidellm-only] [--split-cpus]

1. Protocols: one `ecserve serve` (the engine core in its own process, the default), loaded by
   `ecserve bench`'s closed loop over gRPC and over HTTP in turn, at 1 and 32 streams (16 prompt
   tokens, --output-len new tokens), the order alternating each round. Reports the medians over
   rounds of output tok/s and median TTFT, HTTP / gRPC tok/s at 32 streams (goal >= 0.95) and
   HTTP - gRPC median TTFT at 1 stream (goal within 2 ms).
2. With --guidellm (needs guidellm installed): guidellm 0.8's `run` (openai_http backend,
   /v1/completions, concurrency 4, 32 requests, synthetic 64-token prompts, 32 output tokens,
   the model's own tokenizer directory, offline) and `ecserve bench --protocol http` on the same
   workload (sampled at temperature 1, as guidellm's requests are), alternating, after one
   untimed run of each; their output tok/s should agree within 10%.
The load generators share the machine with the server, as co-located clients would; with
--split-cpus the server (both its processes, one torch thread) runs on CPU 0 and the load
generators (this process, guidellm's) on the others, as clients on machines of their own:
a client's own CPU use then cannot slow the server it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provenance import stamp

from ecserve.loadtest import LoadTestConfig, run_load_test
from ecserve.model.default import default_model_dir
from ecserve.parallel.group import free_port

PROMPT_LEN = 16
GUIDELLM = {"concurrency": 4, "requests": 32, "prompt_tokens": 64, "output_tokens": 32}
# guidellm sends no temperature, so the server samples at OpenAI's default, 1: `ecserve bench`
# samples at it too, for the same work (greedy steps skip the sampler's per-request draws).
GUIDELLM_TEMPERATURE = 1.0


def start_server(grpc_port: int, http_port: int, metrics_port: int,
                 cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    """`ecserve serve`; on `cpus` (its engine-core process too) with one torch thread."""
    cmd = [sys.executable, "-m", "ecserve", "serve", "--port", str(grpc_port),
           "--metrics-port", str(metrics_port), "--http-port", str(http_port),
           "--log-level", "WARNING"]
    if cpus is not None:
        cmd += ["--torch-threads", "1"]
    proc = subprocess.Popen(cmd, preexec_fn=None if cpus is None
                            else lambda: os.sched_setaffinity(0, cpus))
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def bench_level(protocol: str, address: str, streams: int, input_len: int, output_len: int,
                requests: int, temperature: float = 0.0) -> dict[str, float]:
    cfg = LoadTestConfig(address=address, protocol=protocol,  # type: ignore[arg-type]
                         concurrency=streams, input_len=input_len, output_len=output_len,
                         num_requests=requests, warmup_requests=streams, seed=0,
                         metrics_url="", temperature=temperature)
    result = run_load_test(cfg, progress=False)
    if result.failed:
        raise SystemExit(f"{protocol} at {streams} streams: {result.errors}")
    m = result.metrics
    return {"output_throughput": m["output_throughput"], "median_ttft_ms": m["median_ttft_ms"],
            "median_itl_ms": m["median_itl_ms"], "completed": m["completed"]}


def guidellm_run(http_port: int, out_dir: Path, g: dict[str, int]) -> dict[str, Any]:
    """One guidellm run of workload `g`; its throughput, TTFT and request counts."""
    path = out_dir / f"guidellm-{time.monotonic_ns()}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    beside = Path(sys.executable).with_name("guidellm")  # this environment's, off PATH or not
    cmd = [str(beside) if beside.exists() else shutil.which("guidellm") or "guidellm", "run",
           "--backend", f"kind=openai_http,target=http://127.0.0.1:{http_port},model=default,"
           "request_format=/v1/completions",
           "--profile", f"kind=concurrent,streams={g['concurrency']}",
           "--constraint", f"kind=max_requests,count={g['requests']}",
           "--constraint", "kind=max_duration,seconds=300",
           "--data", f"kind=synthetic_text,prompt_tokens={g['prompt_tokens']},"
           f"output_tokens={g['output_tokens']}",
           "--tokenizer", f"kind=huggingface_auto,model={default_model_dir()}",
           "--output", f"kind=json,path={path}", "--disable-console"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    b = json.loads(path.read_text())["benchmarks"][0]
    m = b["metrics"]
    outputs = [r["output_tokens"] for r in b["requests"]["successful"]]
    return {"output_throughput": m["output_tokens_per_second"]["total"]["mean"],
            "median_ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
            "successful": m["request_totals"]["successful"],
            "errored": m["request_totals"]["errored"],
            "output_tokens_each": sorted(set(outputs))}


def server_view(metrics_port: int) -> dict[str, float]:
    """The sums and counts of the server's own request latency (arrival to finish) and step
    time, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    out = dict.fromkeys(("e2e_sum", "e2e_count", "step_sum", "step_count", "front_cpu",
                         "core_cpu", "expert_tokens", "routed_tokens"), 0.0)
    for line in lines:
        name, _, value = line.partition(" ")
        for key, series in (("expert_tokens", "ecserve_expert_tokens_total{"),
                            ("routed_tokens", "ecserve_moe_routed_tokens_total{")):
            if name.startswith(series):  # every MoE layer (and expert)
                out[key] += float(value)
        for key, series in (("front_cpu", "process_cpu_seconds_total"),
                            ("core_cpu", "ecserve_engine_core_process_cpu_seconds_total")):
            if name == series:
                out[key] = float(value)
        for key, series in (("e2e", "ecserve_e2e_request_latency_seconds_"),
                            ("step", "ecserve_step_duration_seconds_")):
            for part in ("sum", "count"):
                if name.startswith(f"{series}{part}{{"):  # summed over the labels
                    out[f"{key}_{part}"] += float(value.split()[0])
    return out


def with_server_view(run: Callable[[], dict[str, Any]], metrics_port: int, concurrency: int,
                     output_tokens: int) -> dict[str, Any]:
    """`run`'s figures, and the throughput the server's own latencies imply for a closed
    loop of `concurrency` streams (streams x tokens / mean latency): a client that takes the
    server's CPU shows there, whatever it measures itself."""
    before = server_view(metrics_port)
    row = run()
    d = {k: v - before[k] for k, v in server_view(metrics_port).items()}
    mean = d["e2e_sum"] / d["e2e_count"]
    return {**row, "server_mean_e2e_ms": mean * 1e3,
            "server_implied_tok_s": concurrency * output_tokens / mean,
            "server_steps": d["step_count"],
            "front_end_cpu_s": d["front_cpu"], "engine_core_cpu_s": d["core_cpu"],
            # Threshold routing (the default model's): a token's experts depend on its text.
            "experts_per_token": d["expert_tokens"] / d["routed_tokens"],
            "server_mean_step_ms": d["step_sum"] / d["step_count"] * 1e3}


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--guidellm", action="store_true",
                        help="also compare guidellm with ecserve bench --protocol http")
    parser.add_argument("--guidellm-only", action="store_true",
                        help="only the guidellm comparison")
    parser.add_argument("--nice-clients", type=int, default=0, metavar="N",
                        help="run the load generators (this process, guidellm) at this "
                             "niceness, the server at its own")
    parser.add_argument("--guidellm-output-tokens", type=int, default=GUIDELLM["output_tokens"])
    parser.add_argument("--guidellm-requests", type=int, default=GUIDELLM["requests"])
    parser.add_argument("--split-cpus", action="store_true",
                        help="the server on CPU 0, the load generators on the other CPUs")
    args = parser.parse_args()
    g = {**GUIDELLM, "output_tokens": args.guidellm_output_tokens,
         "requests": args.guidellm_requests}
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    server_cpus = {min(os.sched_getaffinity(0))} if args.split_cpus else None
    proc = start_server(grpc_port, http_port, metrics_port, server_cpus)
    if server_cpus is not None:  # guidellm, started later, inherits this
        os.sched_setaffinity(0, os.sched_getaffinity(0) - server_cpus)
    if args.nice_clients:
        os.nice(args.nice_clients)  # after the server started: it keeps the default
    grpc_address = f"127.0.0.1:{grpc_port}"
    levels: dict[str, dict[str, list[dict[str, float]]]] = {
        "1": {"grpc": [], "http": []}, "32": {"grpc": [], "http": []}}
    peers: dict[str, list[dict[str, Any]]] = {"guidellm": [], "ecserve_bench_http": []}
    try:
        for r in range(args.rounds if not args.guidellm_only else 0):
            order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
            for streams in (1, 32):
                for protocol in order:
                    address = grpc_address if protocol == "grpc" else f"127.0.0.1:{http_port}"
                    row = bench_level(protocol, address, streams, PROMPT_LEN, args.output_len,
                                      streams * args.requests_per_stream)
                    levels[str(streams)][protocol].append(row)
                    print(f"round {r} {protocol:4s} {streams:2d} streams: "
                          f"{row['output_throughput']:7.1f} tok/s, median TTFT "
                          f"{row['median_ttft_ms']:.2f} ms", flush=True)
        if args.guidellm or args.guidellm_only:
            with tempfile.TemporaryDirectory() as tmp:
                # One untimed run of each first: the server's first steps at these shapes
                # (and the clients' own start) are slower than the rest.
                guidellm_run(http_port, Path(tmp), g)
                bench_level("http", f"127.0.0.1:{http_port}", g["concurrency"],
                            g["prompt_tokens"], g["output_tokens"], g["requests"],
                            GUIDELLM_TEMPERATURE)
                for r in range(args.rounds):
                    pair = ("guidellm", "ecserve_bench_http")
                    for name in pair if r % 2 == 0 else pair[::-1]:
                        def run(name: str = name) -> dict[str, Any]:
                            if name == "guidellm":
                                return guidellm_run(http_port, Path(tmp), g)
                            return bench_level("http", f"127.0.0.1:{http_port}",
                                               g["concurrency"], g["prompt_tokens"],
                                               g["output_tokens"], g["requests"],
                                               GUIDELLM_TEMPERATURE)

                        row = with_server_view(run, metrics_port, g["concurrency"],
                                               g["output_tokens"])
                        peers[name].append(row)
                        print(f"round {r} {name}: {row['output_throughput']:7.1f} tok/s "
                              f"(the server's latencies imply "
                              f"{row['server_implied_tok_s']:.1f}), median TTFT "
                              f"{row['median_ttft_ms']:.1f} ms, server steps "
                              f"{row['server_steps']:.0f} of {row['server_mean_step_ms']:.2f} ms "
                              f"mean, CPU s front end {row['front_end_cpu_s']:.1f} / engine core "
                              f"{row['engine_core_cpu_s']:.1f}, experts per token "
                              f"{row['experts_per_token']:.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    summary: dict[str, float] = {}
    if levels["32"]["grpc"]:
        for streams, rows in levels.items():
            for protocol, runs in rows.items():
                summary[f"{protocol}_tok_s_at_{streams}"] = median_of(runs, "output_throughput")
                summary[f"{protocol}_median_ttft_ms_at_{streams}"] = median_of(
                    runs, "median_ttft_ms")
        summary["http_over_grpc_tok_s_at_32"] = (summary["http_tok_s_at_32"]
                                                 / summary["grpc_tok_s_at_32"])
        summary["http_minus_grpc_ttft_ms_at_1"] = (summary["http_median_ttft_ms_at_1"]
                                                   - summary["grpc_median_ttft_ms_at_1"])
        print(f"HTTP / gRPC tok/s at 32 streams: {summary['http_over_grpc_tok_s_at_32']:.3f} "
              "(goal >= 0.95)")
        print(f"HTTP - gRPC median TTFT at 1 stream: "
              f"{summary['http_minus_grpc_ttft_ms_at_1']:+.2f} ms (goal within 2 ms)")
    if peers["guidellm"]:
        summary["guidellm_tok_s"] = median_of(peers["guidellm"], "output_throughput")
        summary["ecserve_bench_http_tok_s"] = median_of(peers["ecserve_bench_http"],
                                                        "output_throughput")
        summary["guidellm_over_ecserve_bench"] = (summary["guidellm_tok_s"]
                                                  / summary["ecserve_bench_http_tok_s"])
        print(f"guidellm / ecserve bench --protocol http tok/s: "
              f"{summary['guidellm_over_ecserve_bench']:.3f} (goal within 10%)")
        for name, runs in peers.items():
            own = summary[f"{name}_over_server_view"] = statistics.median(
                r["output_throughput"] / r["server_implied_tok_s"] for r in runs)
            summary[f"server_mean_e2e_ms_under_{name}"] = median_of(runs, "server_mean_e2e_ms")
            summary[f"server_mean_step_ms_under_{name}"] = median_of(runs,
                                                                     "server_mean_step_ms")
            print(f"{name}: its tok/s / the server's view of its run = {own:.3f}; the "
                  f"server's mean request latency under it "
                  f"{summary[f'server_mean_e2e_ms_under_{name}']:.1f} ms")
    result = {
        **stamp(__file__, packages=("grpcio", "uvicorn", "guidellm")),
        "summary": summary, "levels": levels, "peers": peers,
        "config": {"model": "default", "engine_core": "process", "prompt_len": PROMPT_LEN,
                   "output_len": args.output_len, "rounds": args.rounds,
                   "requests_per_stream": args.requests_per_stream, "dtype": "float32",
                   "nice_clients": args.nice_clients,
                   "server_cpus": sorted(server_cpus) if server_cpus else "all",
                   "client_cpus": sorted(os.sched_getaffinity(0)),
                   "guidellm_workload": g},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
