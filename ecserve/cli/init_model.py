"""Write a model directory: a copy of the shipped default model (ecserve-code), or with
--random a small model of seeded random weights (byte tokenizer; the same bytes on every
machine), which tests use where a trained model is not the point."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config.fields import flag
from ecserve.errors import ConfigError

HELP = ("copy the default (trained) model's directory to DIR; --random: a model of seeded "
        "random weights instead")


@dataclass(frozen=True)
class InitOptions:
    dir: Path = field(metadata=flag(positional=True))
    """The model directory to write; it must not exist yet."""
    random: bool = False
    """Write a small model of random weights from a fixed seed (byte tokenizer) instead."""
    seed: int | None = None
    """With --random: the weight seed; default: the fixed seed of the tests' model."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, InitOptions)


def run(args: argparse.Namespace) -> int:
    opts = from_flags(InitOptions, args)
    if opts.seed is not None and not opts.random:
        raise ConfigError("--seed chooses random weights: it needs --random", field="seed")
    if opts.dir.exists() or opts.dir.is_symlink():
        raise ConfigError(f"{opts.dir} already exists: init-model writes a new directory "
                          "(give another path, or remove this one)", field="dir")
    from ecserve.model.default import copy_default_model, write_model

    if not opts.random:
        path = copy_default_model(opts.dir)
    elif opts.seed is None:
        path = write_model(opts.dir)
    else:
        path = write_model(opts.dir, seed=opts.seed)
    print(f"wrote {path}")
    return 0
