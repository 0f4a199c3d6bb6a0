"""How much of the model's raw speed the server delivers.

    python bench/bench_serving.py [--json PATH] [--output-len 128] [--requests-per-level 2]
        [--compare placement|decode|openmp] [--engine-core process|thread|both]
        [--torch-threads N] [--levels 1,32] [--serve-arg=--engine-cpus --serve-arg=1 ...]

1. Raw: the engine core, no server, stepping a full batch of B decoding sequences (B = 1 and
   32): B tokens per median decode step, with the server's CPU settings (torch threads: all
   cores but one; OpenMP threads passive). Measured right before and right after the served
   level of the same B (the machine's load drifts), over all those steps. Also, for reference,
   raw with every core and torch's default spinning threads, measured in a child process.
2. Served: `ecserve serve` on the default model in a subprocess, loaded by `ecserve bench`'s
   closed loop at concurrency 1, 2, 4, ..., 64 (each stream: 16 prompt tokens, --output-len new
   tokens; output tok/s over the level's whole run, prefill and ramp included).

What the servers compare (`--compare`), levels interleaved:
- placement (default): the engine core in its own process (ecserve serve's default) and on a
  thread of the server's process (`--engine-core both`; or only one of them);
- decode: the engine core's process with `--decode eager` and with `--decode compiled`;
- openmp: the engine core's process with `--engine-openmp spin` and `passive`.
The servers run with ecserve's own OpenMP settings (the core's threads spin a bounded spell,
the front end's are passive) unless this script was given an OMP_WAIT_POLICY, which they then
all inherit. Prints, for each server, served(32) / raw(32) (goal >= 0.9), served(32) / raw on
every core (goal >= 0.75) and served(32) / served(1) (goal >= 12x), and process / thread at 32.
The load generator shares the machine with the server, as a co-located client would.
"""

from __future__ import annotations

import os

# As `ecserve serve`'s front end does, before torch loads; not in the child that measures
# torch's defaults. The servers get the user's own setting only (kept aside here).
if not os.environ.get("ECSERVE_BENCH_CHILD"):
    os.environ.setdefault("ECSERVE_BENCH_USER_OMP", os.environ.get("OMP_WAIT_POLICY", ""))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch
from provenance import openmp_env, stamp

from ecserve.client import Client
from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.loadtest import LoadTestConfig, run_load_test
from ecserve.parallel.group import free_port
from ecserve.types import Request, SamplingParams

PROMPT_LEN = 16
LEVELS = (1, 2, 4, 8, 16, 32, 64)
# --compare -> server label -> (`ecserve serve --engine-core`, more serve arguments); the run
# reports the first's tok/s at 32 streams over the second's.
COMPARE: dict[str, dict[str, tuple[str, list[str]]]] = {
    "placement": {"process": ("process", []), "thread": ("thread", [])},
    "decode": {"compiled": ("process", ["--decode", "compiled"]),
               "eager": ("process", ["--decode", "eager"])},
    "openmp": {"spin": ("process", ["--engine-openmp", "spin"]),
               "passive": ("process", ["--engine-openmp", "passive"])},
}


def raw_decode_step_times(engine: Engine, batch: int, steps: int) -> list[float]:
    """Seconds of each step of `batch` sequences decoding together (prefill excluded)."""
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        prompt = tuple((i * 31 + j) % 250 for j in range(PROMPT_LEN))
        engine.add_request(Request(f"raw-{batch}-{time.monotonic_ns()}-{i}", prompt, params))
    engine.step()  # the prefill, and every sequence's first token
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def raw_all_cores(output_len: int) -> float:
    """Raw batch-32 decode tok/s with torch's defaults (every core, spinning OpenMP threads):
    a child process, since OpenMP settings are fixed once torch loads."""
    code = ("import statistics, sys; sys.path.insert(0, sys.argv[1]); "
            "from bench_serving import raw_decode_step_times; "
            "from ecserve.config import EngineConfig; from ecserve.engine.engine import Engine; "
            "engine = Engine(None, EngineConfig(device='cpu')); "
            f"t = raw_decode_step_times(engine, 32, {output_len}); "
            "print(32 / statistics.median(t))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["ECSERVE_BENCH_CHILD"] = "1"
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def start_server(port: int, mode: str, threads: int, extra: list[str]
                 ) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "ecserve", "serve", "--port", str(port), "--metrics-port", "0",
           "--log-level", "WARNING", "--engine-core", mode, "--torch-threads", str(threads),
           *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if os.environ.get("ECSERVE_BENCH_USER_OMP"):
        env["OMP_WAIT_POLICY"] = os.environ["ECSERVE_BENCH_USER_OMP"]
    proc = subprocess.Popen(cmd, env=env)
    end = time.monotonic() + 300  # a compiled decode step compiles at start
    with Client(f"127.0.0.1:{port}", timeout=2) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return proc
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.2)


def load_level(port: int, c: int, output_len: int, per_stream: int) -> dict[str, object]:
    """`ecserve bench`'s closed loop at concurrency c against the server on `port`."""
    cfg = LoadTestConfig(
        address=f"127.0.0.1:{port}", concurrency=c, input_len=PROMPT_LEN, output_len=output_len,
        num_requests=c * per_stream, warmup_requests=c, duration=600, seed=0,
    )
    result = run_load_test(cfg, progress=False)
    m = result.metrics
    return {"concurrency": c, "errors": result.errors, **{k: m[k] for k in (
        "completed", "failed", "duration", "output_throughput", "median_ttft_ms",
        "median_itl_ms", "p99_itl_ms")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the sweep and the ratios here")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=2,
                        help="requests per stream at each concurrency level")
    parser.add_argument("--compare", choices=tuple(COMPARE), default="placement",
                        help="what the servers differ in (see above)")
    parser.add_argument("--engine-core", choices=("process", "thread", "both"), default="both",
                        help="with --compare placement, the served engine's place (`ecserve "
                             "serve --engine-core`); both: one server of each")
    parser.add_argument("--torch-threads", type=int,
                        help="the engine's torch threads, served and raw (default: all cores "
                             "but one, as `ecserve serve`)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more `ecserve serve` argument, e.g. --serve-arg=--engine-cpus"
                             " --serve-arg=1 (repeatable)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)),
                        help="concurrency levels (1 and 32 give the ratios)")
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    servers_of = COMPARE[args.compare]
    modes = tuple(servers_of) if args.compare != "placement" or args.engine_core == "both" else (
        args.engine_core,)

    threads = args.torch_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    engine = Engine(None, EngineConfig(device="cpu"))
    raw: dict[int, list[float]] = {1: [], 32: []}  # step times

    def measure_raw(batch: int) -> None:
        raw[batch].extend(raw_decode_step_times(engine, batch, args.output_len))

    ports = {mode: free_port() for mode in modes}
    servers = {}
    sweep: dict[str, list[dict[str, object]]] = {mode: [] for mode in modes}
    try:
        for mode in modes:
            core, extra = servers_of[mode]
            servers[mode] = start_server(ports[mode], core, threads, [*extra, *args.serve_arg])
        for c in levels:
            if c in raw:
                measure_raw(c)
            for mode in modes:
                row = load_level(ports[mode], c, args.output_len, args.requests_per_level)
                sweep[mode].append(row)
                print(f"{mode:7s} concurrency {c:3d}: {row['output_throughput']:8.1f} tok/s, "
                      f"median ITL {row['median_itl_ms']:.2f} ms, p99 ITL "
                      f"{row['p99_itl_ms']:.1f} ms, failed {row['failed']} "
                      f"{row['errors'] or ''}", flush=True)
            if c in raw:
                measure_raw(c)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

    raw_med = {b: b / statistics.median(v) for b, v in raw.items() if v}
    unconstrained = raw_all_cores(args.output_len)
    ratios: dict[str, dict[str, float]] = {}
    for mode in modes:
        served = {row["concurrency"]: row["output_throughput"] for row in sweep[mode]}
        r = ratios[mode] = {}
        if 32 in served and 32 in raw_med:
            r["served_over_raw_at_32"] = served[32] / raw_med[32]
            r["served_over_raw_all_cores_at_32"] = served[32] / unconstrained
        if 32 in served and 1 in served:
            r["scaling_32_over_1"] = served[32] / served[1]
        if 32 in served:
            r["served_tok_s_at_32"] = served[32]
    result = {
        **stamp(__file__, packages=("grpcio",)),
        "ratios": ratios,
        "raw_decode_tok_s": {str(b): v for b, v in raw_med.items()},
        "raw_decode_tok_s_all_cores_spinning_32": unconstrained,
        "raw_decode_steps": {str(b): len(v) for b, v in raw.items()},
        "sweep": sweep,
        "config": {"model": "default", "prompt_len": PROMPT_LEN, "output_len": args.output_len,
                   "torch_threads_server_and_raw": threads, "compare": args.compare,
                   "servers": list(modes),
                   "serve_args": args.serve_arg,
                   "requests_per_level": args.requests_per_level, "dtype": "float32",
                   "omp": openmp_env()},
    }
    print(f"\nraw decode (no server, {threads} torch threads): " + ", ".join(
        f"batch {b} {v:.1f} tok/s" for b, v in raw_med.items()))
    print(f"raw decode, every core, spinning OpenMP (reference): batch 32 {unconstrained:.1f} "
          "tok/s")
    for mode, r in ratios.items():
        print(f"{mode}: " + ", ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    if len(modes) == 2 and all("served_tok_s_at_32" in r for r in ratios.values()):
        first, second = modes
        split = ratios[first]["served_tok_s_at_32"] / ratios[second]["served_tok_s_at_32"]
        result["first_over_second_at_32"] = {"first": first, "second": second, "ratio": split}
        print(f"served(32), {first} / {second} = {split:.3f}")
    print("goals: served/raw(32) >= 0.9, served/raw all cores(32) >= 0.75, 32 vs 1 >= 12x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
