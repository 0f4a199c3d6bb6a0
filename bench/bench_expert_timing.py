"""What the sampled per-expert latency metric costs: engine throughput with expert timing off,
every 64th step (the default) and every step, on the default model.

    python bench/bench_expert_timing.py [--json PATH] [--reps 7]

CPU, float32. 32 requests of 64 prompt tokens and 64 new tokens each, run to the end per
variant; variants interleaved in one process, medians of wall time, ratios against "off".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from provenance import stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams

VARIANTS = {"off": 0, "every 64": 64, "every step": 1}
REQUESTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64


def run_once(engine: Engine, tag: str) -> float:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i in range(REQUESTS):
        prompt = tuple((i * 7 + j) % 250 for j in range(PROMPT_LEN))
        engine.add_request(Request(f"{tag}-{i}", prompt, params))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    engines = {name: Engine(None, EngineConfig(device="cpu", expert_timing_every=every))
               for name, every in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps + 1):
        for name, engine in engines.items():
            t = run_once(engine, f"{rep}")
            if rep:  # the first round warms up
                times[name].append(t)
    base = statistics.median(times["off"])
    rows = {name: {"median_s": statistics.median(ts),
                   "ratio_to_off": statistics.median(ts) / base} for name, ts in times.items()}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {REQUESTS} requests x "
          f"({PROMPT_LEN} prompt + {NEW_TOKENS} new tokens), default model, float32, median of "
          f"{args.reps}")
    print("| expert timing | run time | ratio to off |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s'] * 1e3:.0f} ms | {row['ratio_to_off']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            config = {"model": "default", "dtype": engines["off"].model_cfg.dtype,
                      "requests": REQUESTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                      "reps": args.reps}
            json.dump({**stamp(__file__), "config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
