"""Generate continuations of prompts offline, on this machine's engine (no server), and print
them: one prompt's text as it is generated; several prompts batched together, printed in
order once all are done. Statistics go to standard error."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ecserve.cli.flags import add_flags, from_flags
from ecserve.cli.generation import (
    PROMPT_HELP,
    add_generation_flags,
    read_prompts,
    routing_scope,
    sampling_params,
)
from ecserve.config import EngineConfig, ModelSource
from ecserve.wording import counted

if TYPE_CHECKING:  # the engine (torch) is imported when the command runs
    from ecserve.types import TokenEvent

HELP = "generate continuations of prompts offline and print them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help=PROMPT_HELP + "; several are generated together")
    add_flags(p, ModelSource)
    add_generation_flags(p)
    add_flags(p.add_argument_group("engine"), EngineConfig, exclude=("record_steps",))


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    params = sampling_params(args)
    from ecserve.engine.llm import LLM

    llm = LLM(from_flags(ModelSource, args).resolved(), from_flags(EngineConfig, args))
    scope = routing_scope(args)
    if len(prompts) == 1:
        outs = llm.generate(prompts, params, scope, on_token=_stream)
    else:
        outs = llm.generate(prompts, params, scope)
        for i, out in enumerate(outs):
            sys.stdout.write(f"--- {i + 1} ---\n{out.text}\n")
    for i, out in enumerate(outs):
        where = f"prompt {i + 1}: " if len(outs) > 1 else ""
        print(f"[{where}{counted(len(out.token_ids), 'token')}, finish: "
              f"{out.finish_reason.value}, seed: {out.seed}]", file=sys.stderr)
    return 0


def _stream(ev: TokenEvent) -> None:
    sys.stdout.write(ev.text + ("\n" if ev.finished else ""))
    sys.stdout.flush()
