"""Train an expert-choice model on Python code (by default this interpreter's standard
library) with the default model's whole recipe: corpus, tokenizer, training (resumable: rerun
the same command), export of a model directory with its model card (docs/training.md)."""

from __future__ import annotations

import argparse

from ecserve.cli.flags import add_flags, from_flags
from ecserve.train.options import TrainOptions

HELP = "train an expert-choice model (the default model's recipe) and write its directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TrainOptions)


def run(args: argparse.Namespace) -> int:
    from ecserve.train.recipe import run as train

    return train(from_flags(TrainOptions, args), args.argv)  # recorded as the recipe
