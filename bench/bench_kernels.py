"""Kernel benchmark: each Triton op against its plain-torch twin, and the three issue-7 ratios.

    python bench/bench_kernels.py [--json PATH] [--dtype bfloat16] [--d 2048 --f 1408 --experts 64]

On a GPU: time (median, L2 flushed: triton.testing.do_bench) and TFLOP/s or GB/s per op and
implementation, and
  expert_vs_dense_bmm      cuBLAS bmm chain on pre-gathered rows / fused expert kernel, prefill
                           shapes, same FLOPs (goal >= 0.85)
  decode_bw_over_copy_bw   decode-step expert weight bytes / kernel time, over the device's
                           measured copy bandwidth (goal >= 0.85)
  ec_over_top2_step_time   expert-choice layer step (router, selection, experts, combine) over a
                           top-2 token-choice layer with GShard capacity C = ceil(cf * 2N / E),
                           cf = --tc-capacity-factor, at equal active FLOPs (goal <= 0.8)
and the whole decode step (rows `decode_step`: 1, 8 and --decode-tokens sequences at
--decode-context) eager and replayed from a CUDA graph, against the bandwidth floor (weights
and live KV bytes over the measured copy bandwidth).
On a CPU it times the twins only (Triton runs on the CPU only interpreted, which says nothing
about speed), and writes the JSON with the ratios null and a note saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ecserve_kernels as K
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # tests load this file by path
from provenance import stamp

GOALS = {"expert_vs_dense_bmm": ">= 0.85", "decode_bw_over_copy_bw": ">= 0.85",
         "ec_over_top2_step_time": "<= 0.8"}


def make_timer(gpu: bool, reps: int) -> Callable[[Callable[[], Any]], float]:
    """fn -> median seconds per call."""
    if gpu:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=100,
                                                  return_mode="median") / 1e3

    def cpu(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cpu


def gpu_info(gpu: bool) -> dict[str, Any]:
    """The GPU, its driver and CUDA, for the machine block (nothing on a CPU run)."""
    if not gpu:
        return {}
    info: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    return info


def moe_weights(e: int, d: int, f: int, dtype: torch.dtype, dev: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(0)
    def w(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g, device=dev) * s[-1] ** -0.5).to(dtype)
    return {"w_gate": w(e, f, d), "w_up": w(e, f, d), "w_down": w(e, d, f),
            "router": w(e, d).float()}


def ec_route(x: torch.Tensor, router: torch.Tensor, n: int, k: int, select: Callable):
    """Expert-choice routing of x [N, d] in groups of n: idx, gate [E, (N / n) * k]."""
    s = torch.softmax(x.float() @ router.t(), dim=-1).view(-1, n, router.shape[0])  # [G, n, E]
    idx, gate = select(s, k)  # [G, E, k] local token indices
    offs = (torch.arange(s.shape[0], device=x.device) * n)[:, None, None]
    idx = torch.where(idx >= 0, idx + offs, -1)
    return idx.permute(1, 0, 2).flatten(1), gate.permute(1, 0, 2).flatten(1)


def top2_route(x: torch.Tensor, router: torch.Tensor, cap: int):
    """GShard top-2: first choices claim slots before second choices, token order within each;
    overflow dropped; gates renormalised over the two. idx, gate [E, cap]."""
    e = router.shape[0]
    s = torch.softmax(x.float() @ router.t(), dim=-1)  # [N, E]
    top, exp = s.topk(2, dim=-1)  # [N, 2]
    top = top / top.sum(-1, keepdim=True)
    m1, m2 = F.one_hot(exp[:, 0], e), F.one_hot(exp[:, 1], e)  # [N, E]
    pos1 = (m1.cumsum(0) - 1).gather(1, exp[:, :1])[:, 0]  # [N]
    pos2 = (m2.cumsum(0) - 1 + m1.sum(0)).gather(1, exp[:, 1:])[:, 0]
    idx = torch.full((e, cap + 1), -1, dtype=torch.long, device=x.device)
    gate = torch.zeros((e, cap + 1), dtype=torch.float32, device=x.device)
    tok = torch.arange(x.shape[0], device=x.device)
    for j, pos in ((0, pos1), (1, pos2)):
        p = torch.where(pos < cap, pos, cap)  # overflow goes to a spare column, then cut
        idx[exp[:, j], p] = tok
        gate[exp[:, j], p] = top[:, j]
    return idx[:, :cap], gate[:, :cap]


def row(op: str, impl: str, shape: dict, sec: float, flops: float = 0, nbytes: float = 0):
    r = {"op": op, "impl": impl, "shape": shape, "ms": round(sec * 1e3, 4)}
    if flops:
        r["tflops"] = round(flops / sec / 1e12, 4)
    if nbytes:
        r["gbps"] = round(nbytes / sec / 1e9, 2)
    print(f"{op:<22} {impl:<22} {sec * 1e3:10.3f} ms  "
          + (f"{r['tflops']:8.3f} TFLOP/s " if flops else "")
          + (f"{r['gbps']:9.2f} GB/s " if nbytes else "") + json.dumps(shape))
    return r


def bench_select(t, dev: str, gpu: bool, shapes: list[tuple[int, int, int, int]]) -> list[dict]:
    out = []
    for g, n, e, k in shapes:
        s = torch.softmax(torch.randn(g, n, e, device=dev), dim=-1)
        shape = {"G": g, "n": n, "E": e, "k": k}
        impls = {"torch.sort(stable)": K.ec_select_reference, "torch.topk(keys)": K.ec_select_topk}
        if gpu:
            impls["triton"] = K.ec_select
        for name, fn in impls.items():
            out.append(row("ec_select", name, shape, t(functools.partial(fn, s, k)),
                           nbytes=s.numel() * 4))
    return out


def bench_experts(t, dev: str, gpu: bool, dt: torch.dtype, e: int, d: int, f: int,
                  cases: list[tuple[str, int, int]]) -> tuple[list[dict], dict[str, float]]:
    w = moe_weights(e, d, f, dt, dev)
    wargs = (w["w_gate"], w["w_up"], w["w_down"])
    out, secs = [], {}
    for label, n, k in cases:  # one group of n tokens, k slots per expert
        x = torch.randn(n, d, device=dev).to(dt)
        idx, gate = ec_route(x, w["router"], n, k, K.ec_select_reference)
        flops = 2 * 3 * e * k * d * f
        nbytes = 3 * e * d * f * x.element_size()
        shape = {"case": label, "N": n, "E": e, "K": k, "d": d, "f": f, "dtype": str(dt)}
        impls: dict[str, Callable] = {"reference": K.expert_mlp_reference}
        if gpu:
            impls["triton deterministic"] = K.expert_mlp
            impls["triton atomic"] = lambda *a: K.expert_mlp(*a, combine="atomic")
            xs = x[idx.clamp(min=0)]  # [E, K, d], gathered outside the timed region

            def dense(xs=xs):  # cuBLAS: the same three GEMMs, no gather, no combine
                h = F.silu(torch.bmm(xs, w["w_gate"].transpose(1, 2)))
                h = h * torch.bmm(xs, w["w_up"].transpose(1, 2))
                return torch.bmm(h, w["w_down"].transpose(1, 2))
            impls["cublas bmm (dense)"] = lambda *a: dense()
        for name, fn in impls.items():
            sec = t(functools.partial(fn, x, idx, gate, *wargs))
            secs[f"{label}/{name}"] = sec
            out.append(row("expert_mlp", name, shape, sec, flops=flops, nbytes=nbytes))
    return out, secs


def bench_attention(t, dev: str, gpu: bool, dt: torch.dtype, b: int, h: int, kvh: int,
                    hd: int, ctx: int, bs: int = 16) -> list[dict]:
    mb = math.ceil(ctx / bs)
    kc = torch.randn(b * mb, bs, kvh, hd, device=dev).to(dt)
    vc = torch.randn_like(kc)
    tables = torch.randperm(b * mb, device=dev).view(b, mb)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, h, hd, device=dev).to(dt)
    knew, vnew = torch.randn(2, b, kvh, hd, device=dev).to(dt)
    slots = tables[:, -1].long() * bs + bs - 1
    shape = {"B": b, "H": h, "KVH": kvh, "hd": hd, "ctx": ctx, "block_size": bs, "dtype": str(dt)}
    kv_bytes = 2 * b * ctx * kvh * hd * kc.element_size()
    out = []
    impls = {"reference": (K.paged_decode_attention_reference, K.kv_cache_write_reference)}
    if gpu:
        impls["triton"] = (K.paged_decode_attention, K.kv_cache_write)
    for name, (attn, write) in impls.items():
        out.append(row("paged_decode_attention", name, shape,
                       t(lambda a=attn: a(q, kc, vc, tables, lens)), nbytes=kv_bytes))
        out.append(row("kv_cache_write", name, shape,
                       t(lambda wr=write: wr(knew, vnew, kc, vc, slots)),
                       nbytes=2 * 2 * knew.numel() * knew.element_size()))
    return out


def copy_bandwidth(t) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / t(lambda: dst.copy_(src))


def decode_model(args: argparse.Namespace, dt: torch.dtype, device: str):
    """A random all-MoE model at the bench's expert shapes, built on the device (no file)."""
    from ecserve.config import ModelConfig, RoutingConfig
    from ecserve.model.experts import TritonExperts
    from ecserve.model.kernels import Kernels
    from ecserve.model.transformer import Transformer

    cfg = ModelConfig(
        vocab_size=32000, hidden_size=args.d, num_layers=args.decode_layers, num_heads=16,
        num_kv_heads=4, ffn_hidden_size=args.f, num_experts=args.experts,
        expert_ffn_hidden_size=args.f, max_position_embeddings=args.decode_context,
        moe_layers=tuple(range(args.decode_layers)),
        routing=RoutingConfig(policy="capped", capacity_factor=args.capacity_factor,
                              group_size=64, scope="batch"))
    with torch.device(device):
        model = Transformer(cfg, Kernels("triton", TritonExperts()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(dt).eval()


def bench_decode_step(t, args: argparse.Namespace, dt: torch.dtype, copy_bw: float,
                      device: str = "cuda", capture: bool = True) -> list[dict[str, Any]]:
    """The whole decode step (host plan to logits on the host) eager and replayed from a CUDA
    graph, against the bandwidth floor: every weight and every live KV byte read once.
    (device="cpu", capture=False: the same steps over static buffers, under Triton's
    interpreter; the tests run it that way.)"""
    from ecserve.engine.grouping import batch_group_sizes
    from ecserve.engine.runner import ModelRunner
    from ecserve.types import ScheduledChunk, StepPlan

    model = decode_model(args, dt, device)
    cfg, bs, ctx = model.cfg, 16, args.decode_context
    sizes = sorted({1, 8, args.decode_tokens})
    per_seq = ctx // bs
    eager, graphed = (ModelRunner(model, max(sizes) * per_seq, bs, table_width=per_seq)
                      for _ in range(2))
    blocker = graphed.enable_decode_graphs(max(sizes), 64, capture)
    assert blocker is None, blocker
    elem = torch.finfo(dt).bits // 8
    weight_bytes = sum(p.numel() for p in model.parameters()) * elem
    if not cfg.tie_word_embeddings:  # an untied embedding is read a row per token, not whole
        weight_bytes -= cfg.vocab_size * cfg.hidden_size * elem
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
    rows = []
    for s in sizes:
        unit = cfg.routing.group_unit(cfg.num_experts)
        chunks = tuple(ScheduledChunk(f"r{i}", (i % 1000,), ctx - 1,
                                      tuple(range(i * per_seq, (i + 1) * per_seq)), True)
                       for i in range(s))
        plan = StepPlan(chunks, tuple(batch_group_sizes(s, 64, unit)))
        floor = (weight_bytes + s * ctx * kv_per_token) / copy_bw
        t_eager = t(lambda plan=plan: eager.execute(plan))
        t_graph = t(lambda plan=plan: graphed.execute(plan))
        assert graphed.last_step_graphed and graphed.decode_graphs is not None
        row = {"op": "decode_step", "sequences": s, "context": ctx, "layers": cfg.num_layers,
               "eager_ms": t_eager * 1e3, "graph_ms": t_graph * 1e3, "floor_ms": floor * 1e3,
               "floor_over_eager": floor / t_eager, "floor_over_graph": floor / t_graph,
               "graph_speedup": t_eager / t_graph}
        print(f"decode step x{s:<3} ctx {ctx}: eager {t_eager * 1e3:8.3f} ms  graph "
              f"{t_graph * 1e3:8.3f} ms  floor {floor * 1e3:8.3f} ms  floor/graph "
              f"{floor / t_graph:.3f}  speedup {t_eager / t_graph:.2f}x")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--capacity-factor", type=float, default=2.0, help="expert choice c")
    ap.add_argument("--tc-capacity-factor", type=float, default=2.0, help="top-2 GShard cf")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=2048, help="prefill routing group")
    ap.add_argument("--decode-tokens", type=int, default=64, help="live sequences per step")
    ap.add_argument("--decode-layers", type=int, default=4,
                    help="layers of the decode-step model (all MoE)")
    ap.add_argument("--decode-context", type=int, default=2048, help="decode-step context")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and K.HAS_TRITON
    dev = "cuda" if gpu else "cpu"
    t = make_timer(gpu, args.reps)
    torch.manual_seed(0)
    if gpu:
        dt, e, d, f = getattr(torch, args.dtype), args.experts, args.d, args.f
        n_pre, n_grp, n_dec = args.prefill_tokens, args.group_size, args.decode_tokens
        note = "GPU: Triton kernels against their twins and cuBLAS"
    else:  # small shapes in float32: the twins only
        dt, e, d, f, n_pre, n_grp, n_dec = torch.float32, 8, 256, 512, 512, 256, 16
        note = ("CPU: no GPU, so only the plain-torch twins were timed (Triton runs on the CPU "
                "only interpreted); the ratios need a GPU and are null")
    print(f"== {note}")
    c = args.capacity_factor
    k_pre, k_dec = (min(n, math.ceil(n * c / e)) for n in (n_grp, n_dec))
    results = bench_select(t, dev, gpu, [(n_pre // n_grp, n_grp, e, k_pre), (1, n_dec, e, k_dec)])
    exp_rows, secs = bench_experts(t, dev, gpu, dt, e, d, f,
                                   [("prefill", n_grp, k_pre), ("decode", n_dec, k_dec)])
    results += exp_rows
    results += bench_attention(t, dev, gpu, dt, b=n_dec, h=32 if gpu else 8,
                               kvh=8 if gpu else 2, hd=128 if gpu else 64,
                               ctx=2048 if gpu else 256)
    ratios: dict[str, float | None] = dict.fromkeys(GOALS)
    extra: dict[str, Any] = {}
    if gpu:
        ratios["expert_vs_dense_bmm"] = (secs["prefill/cublas bmm (dense)"]
                                         / secs["prefill/triton deterministic"])
        extra["expert_vs_dense_bmm_atomic"] = (secs["prefill/cublas bmm (dense)"]
                                               / secs["prefill/triton atomic"])
        copy_bw = copy_bandwidth(t)
        wbytes = 3 * e * d * f * torch.finfo(dt).bits // 8
        ratios["decode_bw_over_copy_bw"] = wbytes / secs["decode/triton deterministic"] / copy_bw
        extra["copy_gbps"] = copy_bw / 1e9
        w = moe_weights(e, d, f, dt, dev)
        wargs = (w["w_gate"], w["w_up"], w["w_down"])
        x = torch.randn(n_pre, d, device=dev).to(dt)
        cap = math.ceil(args.tc_capacity_factor * 2 * n_pre / e)

        def ec_layer():
            return K.expert_mlp(x, *ec_route(x, w["router"], n_grp, k_pre, K.ec_select), *wargs)

        def top2_layer():
            return K.expert_mlp(x, *top2_route(x, w["router"], cap), *wargs)
        t_ec, t_tc = t(ec_layer), t(top2_layer)
        ratios["ec_over_top2_step_time"] = t_ec / t_tc
        extra.update(ec_layer_ms=t_ec * 1e3, top2_layer_ms=t_tc * 1e3, top2_capacity=cap,
                     ec_slots_per_expert=k_pre * (n_pre // n_grp))
        del w, wargs, x
        results += bench_decode_step(t, args, dt, copy_bw)
    else:
        print("decode step with and without CUDA graphs: skipped (needs a GPU)")
    for name, value in ratios.items():
        shown = "null (needs a GPU)" if value is None else f"{value:.3f}"
        print(f"ratio {name:<24} {shown}  goal {GOALS[name]}")
    report = {**stamp(__file__, packages=("triton",), **gpu_info(gpu)), "note": note,
              "device": dev, "gpu": gpu,
              "config": {**vars(args), "effective": {"dtype": str(dt), "E": e, "d": d, "f": f,
                                                     "prefill_tokens": n_pre, "group_size": n_grp,
                                                     "decode_tokens": n_dec}},
              "results": results, "ratios": ratios, "goals": GOALS, "extra": extra}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
