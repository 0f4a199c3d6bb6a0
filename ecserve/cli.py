"""The `ecserve` command: generate text, or write a model directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from ecserve.config import DTYPES, SCOPES, ConfigError, EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Flags mirroring EngineConfig (same names, dashed); unset flags keep its defaults."""
    p.add_argument("--model", help="model directory (default: the embedded default model)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="override the checkpoint's dtype")
    p.add_argument("--block-size", type=int, help="tokens per KV cache block (16)")
    p.add_argument("--max-num-seqs", type=int, help="most requests running at once (64)")
    p.add_argument("--max-num-batched-tokens", type=int, help="most tokens per step (512)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output (model's)")
    p.add_argument("--kv-cache-bytes", type=int, help="KV cache size in bytes")
    p.add_argument("--kv-cache-memory-fraction", type=float,
                   help="KV cache share of free device memory when no size is given (0.5)")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of PROMPT and print it")
    gen.add_argument("prompt", help="the prompt text")
    _engine_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="sampling seed (default: drawn at random)")
    gen.add_argument("--routing-scope", choices=SCOPES, help="default: the model's")

    init = sub.add_parser("init-model", help="write the default model's directory to DIR")
    init.add_argument("dir")
    init.add_argument("--seed", type=int, help="weight seed (default: the embedded model's)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from ecserve.engine.llm import LLM
    from ecserve.types import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    llm = LLM(args.model, _engine_config(args))

    def stream(ev) -> None:
        sys.stdout.write(ev.text)
        sys.stdout.flush()

    (out,) = llm.generate(args.prompt, params, args.routing_scope, on_token=stream)
    sys.stdout.write("\n")
    print(f"[{len(out.token_ids)} tokens, finish: {out.finish_reason.value}, seed: {out.seed}]",
          file=sys.stderr)
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from ecserve.model.default import DEFAULT_SEED, write_model

    path = write_model(args.dir, seed=DEFAULT_SEED if args.seed is None else args.seed)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "init-model": _init_model}[args.command](args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 2
