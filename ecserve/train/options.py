"""What `ecserve train` is asked; the defaults are the shipped model's recipe. Light (no
torch), so the command line's parser can use it; the recipe is recipe.py."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ecserve.config.fields import flag

Preset = Literal["ec", "dense", "top2"]
PRESETS: tuple[Preset, ...] = typing.get_args(Preset)


@dataclass(frozen=True)
class TrainOptions:
    out: Path = field(metadata=flag(metavar="DIR"))
    """The model directory to write."""
    work: Path = field(default=Path("ecserve-train"), metadata=flag(metavar="DIR"))
    """Where the corpus, tokenizer, token streams and checkpoints are kept (a rerun of the same
    command resumes from them)."""
    corpus_root: Path | None = field(default=None, metadata=flag(metavar="DIR"))
    """A directory of .py files to train on; default: this interpreter's standard library, the
    shipped model's corpus."""
    preset: Preset = "ec"
    """ec (the shipped model), dense or top2 (the comparisons of equal active FLOPs)."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary size."""
    tokens: float = 30e6
    """Training tokens (they set the steps; 30e6 took about 2 hours on 2 CPU cores with
    AVX512-BF16)."""
    seq_len: int = 512
    """Training sequence length, and the model's context."""
    batch_size: int = 32
    """Sequences per step."""
    group_size: int = 32
    """Routing group: one token from each of this many sequences (the served
    routing.group_size too)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    seed: int = 0
    """Seeds the weights and the batch order."""
    precision: Literal["bfloat16", "float32"] = "bfloat16"
    """Matmuls under bf16 autocast (the router stays float32), or all float32."""
    compile: bool = True
    """torch.compile the training step (1.4x on the 2-core CPU)."""
    device: str = "auto"
    """auto (cuda when present) | cpu | cuda."""
    threads: int | None = None
    """torch CPU threads; default: torch's."""
    max_steps_now: int | None = field(default=None, metadata=flag(metavar="N"))
    """Stop this sitting after so many steps (rerun the command to resume)."""
    name: str | None = None
    """The run's name in the work directory; default: from the recipe."""
