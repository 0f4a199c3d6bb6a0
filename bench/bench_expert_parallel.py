"""Expert parallelism on one machine: cross-device tokens and step time, balanced vs affinity.

    python bench/bench_expert_parallel.py [--json PATH] [--ranks 1,2,4] [--model DIR]

One workload (default: the default model, 16 requests of 64 random prompt tokens + 32 new tokens,
greedy, EOS ignored, all queued at once, the model's routing scope: batch for the default model)
runs in one process and then over 2 and 4 local ranks (torch.distributed, gloo, CPU) with the
balanced plan and with the affinity plan the planner makes from the same workload's routing
(ecserve.placement.collect_routing_stats' recorder, record_routing). Per configuration:
- cross-device token rows per step: counted by the executor (every MoE layer's split sizes, off
  the diagonal, summed over layers, per step) next to the planner's prediction for the same
  steps (ecserve.placement.cross_device_tokens, no dedup: what the all_to_all moves; with dedup
  in brackets: what a sender that deduplicates a token per device would move);
- median step time (rank 0's Engine.step wall time) and generated tokens per second.
Every rank uses --threads torch threads (default 1): on a small machine 4 ranks oversubscribe
the cores, and the output says so. Step times on CPU measure the gloo exchange overhead at this
model size, not a speed-up: the point of expert parallelism is memory and multi-device capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir
from ecserve.model.weights import read_config
from ecserve.placement import affinity_placement, cross_device_tokens
from ecserve.placement.routing_stats import record_routing, synthetic_prompts
from ecserve.types import Request, SamplingParams


def engine_config(device: str, record: bool) -> EngineConfig:
    return EngineConfig(device=device, dtype="float32", kv_cache_bytes=1 << 27,
                        expert_timing_every=0, record_steps=record)


def run_workload(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Queue every request, step to completion; each step's wall seconds on rank 0."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"bench-{i}", tuple(p), params))
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def run_config(model_dir: Path, world: int, plan, prompts, new_tokens: int, device: str,
               backend: str, threads: int) -> dict:
    from ecserve.parallel.driver import ExpertParallel
    from ecserve.parallel.moe_ep import owned_experts, traffic

    cfg = engine_config(device, record=False)
    if world == 1:
        engine = Engine(model_dir, cfg)
        times = run_workload(engine, prompts, new_tokens)
        return {"times": times, "counted": 0.0, "per_rank_sent": [0]}
    ep = ExpertParallel(read_config(model_dir), world, plan, backend=backend, timeout_s=120,
                        worker_threads=threads)
    try:
        engine = Engine(model_dir, cfg, experts=owned_experts(plan, 0), lockstep=ep.attach)
    except BaseException:
        ep.close()
        raise
    try:
        times = run_workload(engine, prompts, new_tokens)
        counted = traffic(engine.runner.model)
    finally:
        ep.close()
    cross = sum(int(m.sum() - m.trace()) for m, _ in counted.values())
    sent = sum(m for m, _ in counted.values())  # [W, W] rows[src, dst] over layers
    per_rank = [int(sent[r].sum() - sent[r, r]) for r in range(world)]
    return {"times": times, "counted": cross / len(times), "per_rank_sent": per_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: the default model)")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (1,2,4)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table and the machine to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = Path(a.model) if a.model else default_model_dir()
    mc = read_config(model_dir)
    prompts = synthetic_prompts(a.requests, mc.vocab_size, (mc.bos_token_id, mc.eos_token_id),
                                a.seed, a.prompt_len, a.prompt_len)
    t0 = time.perf_counter()
    # The workload's routing, step by step (the same steps every configuration runs).
    stats = record_routing(Engine(model_dir, engine_config(a.device, record=True)), prompts,
                           a.new_tokens)
    from ecserve.parallel.moe_ep import default_placement

    ranks = [int(r) for r in a.ranks.split(",")]
    cores = os.cpu_count() or 1
    rows = []
    for world in ranks:
        balanced = default_placement(mc, world)
        configs = [("single process", balanced)] if world == 1 else [
            ("balanced", balanced),
            ("affinity", affinity_placement(balanced.model, balanced.devices, stats,
                                            seed=a.seed))]
        for name, plan in configs:
            r = run_config(model_dir, world, plan, prompts, a.new_tokens, a.device, a.backend,
                           a.threads)
            steps = len(r["times"])
            assert steps == stats.num_steps(min(stats.layers)), "the steps differ"
            predicted = sum(cross_device_tokens(plan, stats, dedup=False).values())
            dedup = sum(cross_device_tokens(plan, stats).values())
            rows.append({
                "ranks": world, "placement": name, "steps": steps,
                "counted_tokens_per_step": round(r["counted"], 2),
                "predicted_tokens_per_step": round(predicted, 2),
                "predicted_dedup_tokens_per_step": round(dedup, 2),
                "counted_sent_per_rank": r["per_rank_sent"],
                "median_step_ms": round(1e3 * statistics.median(r["times"]), 2),
                "tokens_per_s": round(a.requests * a.new_tokens / sum(r["times"]), 1),
                "oversubscribed": world * a.threads > cores,
            })
            print(f"done: {world} rank(s), {name} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    print()
    print(f"{a.requests} requests x ({a.prompt_len} prompt + {a.new_tokens} new tokens), "
          f"{model_dir.name if a.model else 'default model'}, scope {mc.routing.scope}, "
          f"{stats.num_steps(min(stats.layers))} steps; {a.threads} torch thread(s) per rank "
          f"on {cores} CPU(s)")
    print(f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{a.device}/{a.backend}")
    print()
    print("| ranks | placement | cross-device tokens/step counted | predicted (dedup) "
          "| rows sent per rank, all steps | median step ms | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        over = " (oversubscribed)" if r["oversubscribed"] else ""
        print(f"| {r['ranks']}{over} | {r['placement']} | {r['counted_tokens_per_step']:.2f} "
              f"| {r['predicted_tokens_per_step']:.2f} ({r['predicted_dedup_tokens_per_step']:.2f})"
              f" | {r['counted_sent_per_rank']} | {r['median_step_ms']:.2f} "
              f"| {r['tokens_per_s']:.1f} |")
    if any(r["oversubscribed"] for r in rows):
        print(f"\noversubscribed: more ranks x threads than the {cores} CPU(s); step times "
              "there include waiting for a core")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({**stamp(__file__), "workload": {
            "model": model_dir.name if a.model else "default", "requests": a.requests,
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "scope": mc.routing.scope,
            "seed": a.seed, "device": a.device, "backend": a.backend,
            "threads_per_rank": a.threads}, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
