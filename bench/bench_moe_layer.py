"""MoE layer cost on CPU: the batched expert-choice layer against a per-expert Python loop and
against a dense GEMM of equal FLOPs (the machine's own limit for the useful math).

    python bench/bench_moe_layer.py [--json PATH] [--reps 15]

float32 (bf16 matmul on many CPUs is 100-200x slower). Variants run interleaved in one process
and each reports its median, so machine noise hits all of them alike; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from provenance import stamp

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.moe import MoELayer
from ecserve.routing import expert_choice


def make_layer(d: int, f: int, e: int, c: float, n: int) -> MoELayer:
    cfg = ModelConfig(
        vocab_size=8, hidden_size=d, num_layers=2, num_heads=8, ffn_hidden_size=f,
        num_experts=e, expert_ffn_hidden_size=f,
        routing=RoutingConfig(policy="ec", capacity_factor=c, group_size=n),
    )
    layer = MoELayer(cfg, layer=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, d**-0.5, generator=gen)
    return layer.requires_grad_(False)


def loop_layer(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The obvious implementation: same routing, then one small GEMM chain per expert."""
    scores = layer.scores(x)
    idx, gate = expert_choice(scores, layer.routing.capacity(x.shape[0], scores.shape[1]))
    y = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(idx.shape[0]):
        xs = x[idx[e]]
        h = layer.act(F.linear(xs, layer.w_gate[e])) * F.linear(xs, layer.w_up[e])
        y.index_add_(0, idx[e], F.linear(h, layer.w_down[e]).float() * gate[e, :, None])
    return y


def dense_glu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def bench_case(n: int, d: int, f: int, e: int, c: float, reps: int) -> dict:
    layer = make_layer(d, f, e, c, n)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    k = layer.routing.capacity(n, e)
    rows = e * k  # token-expert pairs the experts process: the useful work
    x_dense = torch.randn(rows, d)
    wg, wu, wd = layer.w_gate[0].clone(), layer.w_up[0].clone(), layer.w_down[0].clone()
    weights = (layer.w_gate, layer.w_up, layer.w_down)
    variants = {
        "batched_ec_layer": lambda: layer(x, (0, n)),
        "per_expert_loop": lambda: loop_layer(layer, x),
        "dense_gemm_equal_flops": lambda: dense_glu(x_dense, wg, wu, wd),
        # Reading every expert weight once: the floor when small groups make it memory-bound.
        "stream_expert_weights": lambda: [w.sum() for w in weights],
    }
    # Same answer from the batched layer and the loop, or the comparison is meaningless.
    torch.testing.assert_close(layer(x, (0, n))[0], loop_layer(layer, x), atol=1e-4, rtol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    flops = 2 * rows * d * f * 3  # gate, up and down projections
    return {
        "group_tokens": n, "capacity_k": k, "median_s": med,
        "dense_gflops_per_s": flops / med["dense_gemm_equal_flops"] / 1e9,
        "layer_over_dense_gemm": med["batched_ec_layer"] / med["dense_gemm_equal_flops"],
        "loop_over_batched": med["per_expert_loop"] / med["batched_ec_layer"],
        "layer_over_weight_stream": med["batched_ec_layer"] / med["stream_expert_weights"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024, help="expert hidden width")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--capacity-factor", type=float, default=2.0)
    args = ap.parse_args()
    config = {"width": args.width, "expert_ffn": args.ffn, "experts": args.experts,
              "capacity_factor": args.capacity_factor, "dtype": "float32", "policy": "ec",
              "reps": args.reps}
    result = {**stamp(__file__), "config": config, "cases": []}
    print(f"machine: {result['machine']}\nconfig:  {config}")
    for n in (2048, 64):
        case = bench_case(n, args.width, args.ffn, args.experts, args.capacity_factor, args.reps)
        result["cases"].append(case)
        m = case["median_s"]
        print(f"\ngroup of {n} tokens (k = {case['capacity_k']} per expert), median of "
              f"{args.reps}:")
        for name, t in m.items():
            print(f"  {name:24s} {t * 1e3:9.2f} ms")
        print(f"  layer / dense GEMM       {case['layer_over_dense_gemm']:9.2f}x"
              f"   (dense runs at {case['dense_gflops_per_s']:.0f} GFLOP/s)")
        print(f"  loop / batched           {case['loop_over_batched']:9.2f}x")
        print(f"  layer / weight stream    {case['layer_over_weight_stream']:9.2f}x")
    # The headline figures are the full-size group's.
    result["layer_over_dense_gemm"] = result["cases"][0]["layer_over_dense_gemm"]
    result["loop_over_batched"] = result["cases"][0]["loop_over_batched"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
