"""What each decode policy costs in quality: held-out NLL of a trained model through the engine.

    python bench/bench_decode_policies.py [--model DIR] [--windows 64] [--window-len 256]
        [--batches 4,16,64] [--json PATH]

The validation split of the model's corpus (the stdlib files its recipe held out, re-extracted
from this interpreter and checked against the model card's sha256) is tokenized and cut into
`--windows` windows of `--window-len` tokens. Every window is scored with `prompt_logprobs`
through the engine's own step path (batcher, routing groups, KV cache), one prompt token per
sequence per step (`max_prefill_chunk=1`): with B live sequences in lock-step each step is one
routing group of B tokens, one per sequence, exactly what a batch-scope decode step of B live
sequences forms. So each row is the model's quality when decoding under that policy and load.

Rows: the reference (a direct model call with the training grouping: `ec`, groups of one token
from each of group_size sequences at one position); for `ec`, `capped` (b = E, 2, 1),
`threshold` and token-choice top-ceil(c), batch scope at B = 4, 16, 64 live sequences and
sequence scope (a decode token is a group of one, whatever B; so this row is also batch scope at
B = 1, which is therefore not run separately: scored one sequence at a time it would take 64x the
steps for the same routing). For each: nats/token, bits/byte,
the difference from the reference in %, the experts-per-token histogram over all MoE layers,
and decode tokens/s (B sequences generating 32 tokens after a 16-token prompt, float32, median
step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from provenance import cpu_name, stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir
from ecserve.model.weights import load_model, read_config
from ecserve.train import bpe, corpus
from ecserve.train.data import Windows, encode_stream
from ecserve.train.forward import forward, token_nll
from ecserve.types import Request, SamplingParams, StepStats

BUCKETS = ("0", "1", "2", "3-4", "5+")  # experts per token, as the paper reports them


@dataclass(frozen=True)
class Policy:
    label: str
    policy: str  # EngineConfig.routing_policy
    b: int | None = None  # EngineConfig.max_experts_per_token (None: the model's)


@dataclass
class Row:
    policy: str
    scope: str  # batch | sequence | training (the reference)
    live: int  # live sequences per step (B)
    nats_per_token: float
    bits_per_byte: float
    delta_pct: float = 0.0
    experts_per_token: dict[str, float] | None = None  # share of routed tokens per bucket
    mean_experts: float | None = None
    decode_tok_s: float | None = None


class RoutingCounter:
    """An engine observer summing every MoE layer's experts-per-token histogram."""

    def __init__(self, num_experts: int) -> None:
        self.hist = torch.zeros(num_experts + 1, dtype=torch.long)

    def step_done(self, stats: StepStats) -> None:
        for m in stats.moe:
            self.hist += m.experts_per_token.cpu()

    def request_done(self, stats: object) -> None:
        pass

    def shares(self) -> tuple[dict[str, float] | None, float | None]:
        h = self.hist.double()
        total = float(h.sum())
        if not total:  # a dense model: nothing routed
            return None, None
        k = torch.arange(len(h), dtype=torch.float64)
        parts = {"0": h[0], "1": h[1], "2": h[2], "3-4": h[3:5].sum(), "5+": h[5:].sum()}
        return ({b: float(v) / total for b, v in parts.items()}, float((k * h).sum()) / total)


def validation_windows(model_dir: Path, count: int, length: int) -> tuple[torch.Tensor, Path]:
    """int64 [count, length]: the first windows of the model's validation split."""
    record = json.loads((model_dir / "training.json").read_text())
    c = record["corpus"]
    docs, _ = corpus.read_stdlib(corpus.stdlib_dir())
    valid = corpus.split_documents(docs, "valid", c["valid_per_mille"])
    data = "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in valid).encode()
    if hashlib.sha256(data).hexdigest() != c["sha256"]["valid"]:
        print(f"WARNING: this interpreter's stdlib is not the model's corpus ({c['python']}); "
              "scoring its validation split anyway", file=sys.stderr)
    cfg = read_config(model_dir)
    tok = model_dir / bpe.TOKENIZER_FILE
    stream = encode_stream(valid, tok, cfg.bos_token_id, cfg.eos_token_id)
    windows = Windows(stream, length - 1)  # windows of `length` tokens at stride length - 1
    if windows.count < count:
        raise SystemExit(f"the validation split has {windows.count} windows of {length} tokens, "
                         f"fewer than --windows {count}")
    return windows.take(torch.arange(count).numpy()), tok


def reference(model_dir: Path, ids: torch.Tensor, token_bytes: torch.Tensor) -> Row:
    """The training grouping (`ec`, one token from each of group_size sequences per group), by
    a direct model call (ecserve.train.forward), float32."""
    cfg = read_config(model_dir)
    group = cfg.routing.group_size
    if len(ids) % group:
        raise SystemExit(f"--windows must be a multiple of the model's group size {group}")
    cfg = replace(cfg, routing=replace(cfg.routing, policy="ec"))
    model = load_model(model_dir, cfg, "cpu", torch.float32)
    nats = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), group):
            batch = ids[i:i + group]
            nats += float(token_nll(forward(model, batch[:, :-1], group), batch[:, 1:])
                          .double().sum())
    return _row("reference: training grouping", "training", group, nats, ids, token_bytes)


def _row(label: str, scope: str, live: int, nats: float, ids: torch.Tensor,
         token_bytes: torch.Tensor) -> Row:
    tokens = ids[:, 1:].numel()
    nbytes = int(token_bytes[ids[:, 1:]].sum())
    return Row(label, scope, live, nats / tokens, nats / math.log(2) / nbytes)


def engine_config(p: Policy, live: int, window_len: int, **extra: object) -> EngineConfig:
    settings: dict = {"max_num_batched_tokens": max(64, live), **extra}
    return EngineConfig(device="cpu", dtype="float32", max_num_seqs=live,
                        max_model_len=window_len + 40, routing_policy=p.policy,
                        max_experts_per_token=p.b, expert_timing_every=0, **settings)


def score(model_dir: Path, p: Policy, scope: str, live: int, ids: torch.Tensor,
          token_bytes: torch.Tensor) -> Row:
    """Score every window with prompt_logprobs, `live` sequences at a time, one token each
    per step."""
    engine = Engine(model_dir, engine_config(p, live, ids.shape[1], max_prefill_chunk=1))
    counter = RoutingCounter(engine.model_cfg.num_experts)
    engine.observer = counter
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=0)
    for i, window in enumerate(ids.tolist()):
        engine.add_request(Request(f"w{i}", tuple(window), params, routing_scope=scope))
    nats = 0.0
    while engine.has_unfinished():
        for ev in engine.step():
            nats -= sum(lp[0] for lp in ev.prompt_logprobs[1:])
    row = _row(p.label, scope, live, nats, ids, token_bytes)
    row.experts_per_token, row.mean_experts = counter.shares()
    return row


def lockstep_budget(live: int, prompt_len: int) -> int:
    """max_num_batched_tokens that prefills every prompt in one step, so all then decode in
    lock-step."""
    return max(64, live * (1 + prompt_len))


def pure_decode_step_times(engine: Engine, prompts: torch.Tensor, live: int, new_tokens: int,
                           scope: str | None = None,
                           on_step: Callable[[], None] | None = None) -> list[float]:
    """Run `live` sequences (prompts cycled) for `new_tokens`; the seconds of each step in
    which every one of them decoded one token (the prefill step left out). on_step runs after
    each such step, outside its time."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i in range(live):
        engine.add_request(Request(f"d{i}", tuple(prompts[i % len(prompts)].tolist()), params,
                                   routing_scope=scope))
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        plan = engine.last_stats.plan if engine.last_stats else None
        if plan and len(plan.chunks) == live and all(len(c.token_ids) == 1 for c in plan.chunks):
            times.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step()
    return times


def decode_speed(model_dir: Path, p: Policy, scope: str, live: int, prompts: torch.Tensor,
                 steps: int = 32) -> float:
    """Tokens/s of `live` sequences decoding together: live / median pure-decode step time."""
    engine = Engine(model_dir, engine_config(
        p, live, prompts.shape[1] + steps,
        max_num_batched_tokens=lockstep_budget(live, prompts.shape[1])))
    return live / statistics.median(pure_decode_step_times(engine, prompts, live, steps + 1,
                                                           scope))


def policies(num_experts: int, capacity_factor: float) -> list[Policy]:
    return [Policy("ec", "ec"), Policy("capped b=E", "capped", num_experts),
            Policy("capped b=2", "capped", 2), Policy("capped b=1", "capped", 1),
            Policy("threshold", "threshold"),
            Policy(f"token choice top-{math.ceil(capacity_factor)}", "token_choice")]


def print_table(rows: list[Row]) -> None:
    head = (f"{'policy':<22} {'scope':<9} {'B':>3} {'nats/tok':>9} {'bits/byte':>9} "
            f"{'vs ref':>8} " + " ".join(f"{b:>5}" for b in BUCKETS) + f" {'mean':>5} "
            f"{'decode tok/s':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        hist = (" ".join(f"{100 * r.experts_per_token[b]:>4.1f}%" for b in BUCKETS)
                if r.experts_per_token else " ".join(f"{'':>5}" for _ in BUCKETS))
        mean = f"{r.mean_experts:>5.2f}" if r.mean_experts is not None else f"{'':>5}"
        speed = f"{r.decode_tok_s:>12,.0f}" if r.decode_tok_s else f"{'':>12}"
        print(f"{r.policy:<22} {r.scope:<9} {r.live:>3} {r.nats_per_token:>9.4f} "
              f"{r.bits_per_byte:>9.4f} {r.delta_pct:>+7.2f}% {hist} {mean} {speed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    ap.add_argument("--windows", type=int, default=64, help="validation windows scored (64)")
    ap.add_argument("--window-len", type=int, default=256, help="tokens per window (256)")
    ap.add_argument("--batches", default="4,16,64", help="live sequences B (4,16,64)")
    ap.add_argument("--policies", help="labels to run, comma-separated (default: all)")
    ap.add_argument("--no-speed", dest="speed", action="store_false",
                    help="skip the decode tokens/s column")
    ap.add_argument("--json", type=Path, help="write the rows and the setup here")
    a = ap.parse_args(argv)
    model_dir = a.model or default_model_dir()
    mc = read_config(model_dir)
    torch.manual_seed(0)
    ids, tok = validation_windows(model_dir, a.windows, a.window_len)
    token_bytes = torch.tensor(bpe.token_bytes(tok))
    setup = {"model": str(model_dir), "windows": a.windows, "window_len": a.window_len,
             "scored_tokens": ids[:, 1:].numel(), "dtype": "float32", "cpu": cpu_name(),
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version()}
    print(" ".join(f"{k}={v}" for k, v in setup.items()), flush=True)
    ref = reference(model_dir, ids, token_bytes)
    rows = [ref]
    chosen = policies(mc.num_experts, mc.routing.capacity_factor)
    if a.policies:
        keep = set(a.policies.split(","))
        chosen = [p for p in chosen if p.label in keep]
    lives = [int(b) for b in a.batches.split(",")]
    prompts = ids[:, :16]
    for p in chosen:
        for scope, live in [("batch", b) for b in lives] + [("sequence", max(lives))]:
            t0 = time.perf_counter()
            row = score(model_dir, p, scope, live, ids, token_bytes)
            row.delta_pct = 100 * (row.nats_per_token / ref.nats_per_token - 1)
            if a.speed:
                row.decode_tok_s = decode_speed(model_dir, p, scope, live, prompts)
            rows.append(row)
            print(f"  {p.label} {scope} B={live}: {row.nats_per_token:.4f} nats/token "
                  f"({row.delta_pct:+.2f}%), {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print_table(rows)
    if a.json:
        a.json.write_text(json.dumps({**stamp(__file__, argv), "setup": setup,
                                      "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
