"""Place each MoE layer's experts on devices (balanced, or affinity-aware from the model's own
routing statistics, optionally with replicas of hot experts) and print the placement with its
predicted cross-device traffic; --save writes it for `ecserve serve --placement`."""

from __future__ import annotations

import argparse

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config import ModelSource
from ecserve.placement.options import PlanOptions

HELP = "place experts on devices; print the predicted cross-device traffic"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, ModelSource)
    add_flags(p, PlanOptions, exclude=("prompts", "synthetic_requests"))
    add_flags(p.add_mutually_exclusive_group(), PlanOptions,
              only=("prompts", "synthetic_requests"))


def run(args: argparse.Namespace) -> int:
    from ecserve.placement.command import run as plan

    return plan(from_flags(ModelSource, args).resolved(), from_flags(PlanOptions, args))
