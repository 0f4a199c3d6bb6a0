"""`ecserve train`'s flags (light: the parser imports no torch); the recipe is recipe.py."""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = ("ec", "dense", "top2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's flags; their defaults are the shipped model's recipe."""
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--work", type=Path, default=Path("ecserve-train"),
                   help="where the corpus, tokenizer, token streams and checkpoints are kept "
                        "(./ecserve-train)")
    p.add_argument("--corpus-root", type=Path,
                   help="directory of .py files to train on (default: this interpreter's "
                        "standard library, the shipped model's corpus)")
    p.add_argument("--preset", choices=PRESETS, default="ec",
                   help="ec (the shipped model), dense or top2 (the comparisons)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokens", type=float, default=30e6,
                   help="training tokens (sets the steps; default 30e6: about 2 hours on 2 "
                        "CPU cores with AVX512-BF16)")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length, and the "
                   "model's context (512)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (32)")
    p.add_argument("--group-size", type=int, default=32,
                   help="routing group: one token from each of this many sequences (32; the "
                        "served routing.group_size too)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("bfloat16", "float32"), default="bfloat16",
                   help="matmuls under bf16 autocast (router in float32) or all float32")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the step eagerly (default: torch.compile it, 1.4x here)")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-steps-now", type=int,
                   help="stop this sitting after so many steps (rerun the command to resume)")
    p.add_argument("--name", help="run name in the work directory (default: from the recipe)")
