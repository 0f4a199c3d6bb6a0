"""The seed paper's claim at small scale: expert choice against a dense model of equal active
FLOPs and token-choice top-2, trained by the same recipe on the same budget, then served.

    ecserve train --preset ec    --tokens 6e6 --out runs/ec    # the same flags for all three
    ecserve train --preset dense --tokens 6e6 --out runs/dense
    ecserve train --preset top2  --tokens 6e6 --out runs/top2
    python bench/bench_seed_claim.py runs/ec runs/dense runs/top2 [--plot PNG] [--json PATH]

For each model directory: its held-out loss (the model card's: validation split, training
grouping, stored weights), training tokens, wall time and training tokens/s at the median step
(robust to a sitting shared with other work; all from training.json); then, served by
the offline engine in float32 on this machine, decode tokens/s with 1 and 32 streams (each
stream: a 16-token prompt, 64 new tokens; median pure-decode step, interleaved rounds) and the
held-out NLL as served at 32 live sequences (`bench_decode_policies.py`'s lock-step scoring, the
model's own serving policy). The training curves go into one plot.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_policies import (
    Policy,
    lockstep_budget,
    pure_decode_step_times,
    score,
    validation_windows,
)
from provenance import cpu_name, stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.weights import read_config
from ecserve.train import bpe

WINDOW_LEN = 256  # tokens per scored validation window
SERVED_LIVE = 32  # live sequences when scoring the served loss


def decode_step_times(model_dir: Path, streams: int, prompts: torch.Tensor,
                      new_tokens: int = 64) -> list[float]:
    engine = Engine(model_dir, EngineConfig(
        device="cpu", dtype="float32", max_num_seqs=streams, expert_timing_every=0,
        max_num_batched_tokens=lockstep_budget(streams, prompts.shape[1])))
    return pure_decode_step_times(engine, prompts, streams, new_tokens)


def median_train_tok_s(record: dict) -> float:
    """Training tokens/s at the median step (steps timed with their evaluations excluded)."""
    step_tokens = record["train"]["batch_size"] * record["train"]["seq_len"]
    seconds = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(record["history"])
               if "valid" not in b]
    return step_tokens / statistics.median(seconds)


def plot(records: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in records.items():
        hist = r["history"]
        tokens = [h["tokens"] / 1e6 for h in hist]
        minutes = [h["seconds"] / 60 for h in hist]
        loss = [h["loss"] for h in hist]
        for ax, x in zip(axes, (tokens, minutes), strict=True):
            (line,) = ax.plot(x, _smooth(loss), label=f"{name} (train)", lw=1.2)
            vx = [xx for xx, h in zip(x, hist, strict=True) if "valid" in h]
            vy = [h["valid"] for h in hist if "valid" in h]
            ax.plot(vx, vy, "o--", color=line.get_color(), ms=4, label=f"{name} (validation)")
    axes[0].set_xlabel("training tokens (M)")
    axes[1].set_xlabel("training wall time (min), this CPU")
    for ax in axes:
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Same recipe and budget: expert choice vs dense (equal active FLOPs) vs "
                 "token-choice top-2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model directories from ecserve train")
    ap.add_argument("--streams", default="1,32", help="concurrent streams (1,32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--windows", type=int, default=64, help="validation windows scored (64)")
    ap.add_argument("--plot", type=Path, help="write the training curves here (PNG)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    records = {m.name: json.loads((m / "training.json").read_text()) for m in a.models}
    streams = [int(s) for s in a.streams.split(",")]
    ids, _ = validation_windows(a.models[0], a.windows, WINDOW_LEN)
    prompts = ids[:, :16]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(a.rounds):  # interleaved: the machine's load drifts
        for m in a.models:
            for s in streams:
                times.setdefault((m.name, s), []).extend(decode_step_times(m, s, prompts))
    served_nll = {}
    for m in a.models:
        cfg = read_config(m)
        tb = torch.tensor(bpe.token_bytes(m / bpe.TOKENIZER_FILE))
        row = score(m, Policy(cfg.routing.policy, cfg.routing.policy), "batch", SERVED_LIVE, ids,
                    tb)
        served_nll[m.name] = row.nats_per_token
    print(f"cpu={cpu_name()} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"dtype=float32 rounds={a.rounds}")
    head = (f"{'model':<8} {'params':>7} {'active':>7} {'tokens':>7} {'train h':>7} "
            f"{'train tok/s':>11} "
            f"{'held-out':>9} {'bits/B':>7} {'served@32':>9} "
            + " ".join(f"{f'tok/s@{s}':>10}" for s in streams))
    print(head)
    print("-" * len(head))
    out = {}
    for m in a.models:
        r = records[m.name]
        p, h = r["parameters"], r["held_out"]
        speed = {s: s / statistics.median(times[(m.name, s)]) for s in streams}
        train_tok_s = median_train_tok_s(r)
        print(f"{m.name:<8} {p['total'] / 1e6:>6.1f}M {p['active_per_token'] / 1e6:>6.1f}M "
              f"{r['tokens'] / 1e6:>6.1f}M {r['train_seconds'] / 3600:>7.2f} {train_tok_s:>11,.0f} "
              f"{h['nats_per_token']:>9.4f} {h['bits_per_byte']:>7.4f} "
              f"{served_nll[m.name]:>9.4f} " + " ".join(f"{speed[s]:>10,.0f}" for s in streams))
        out[m.name] = {"parameters": p, "tokens": r["tokens"], "train_seconds":
                       r["train_seconds"], "train_tok_s_median_step": train_tok_s,
                       "held_out": h, "served_nll_32": served_nll[m.name],
                       "policy": read_config(m).routing.policy,
                       "decode_tok_s": {str(s): v for s, v in speed.items()}}
    if a.plot:
        plot(records, a.plot)
        print(f"training curves: {a.plot}")
    if a.json:
        config = {"streams": streams, "rounds": a.rounds, "windows": a.windows,
                  "window_len": WINDOW_LEN, "served_live": SERVED_LIVE, "dtype": "float32"}
        plots = {"plots": [str(a.plot)]} if a.plot else {}  # bench/tables.py embeds them
        a.json.write_text(json.dumps({**stamp(__file__, argv), "config": config, **plots,
                                      "models": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
