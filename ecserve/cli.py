"""The `ecserve` command: serve a model over gRPC, call a server, generate offline."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ecserve.config import DTYPES, POLICIES, SCOPES, ConfigError, EngineConfig, ServerConfig
from ecserve.security import add_client_arguments, client_security
from ecserve.wording import counted


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Flags mirroring EngineConfig (same names, dashed); unset flags keep its defaults."""
    p.add_argument("--model", help="model directory (default: the shipped model, ecserve-code)")
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
    p.add_argument("--max-waiting", type=int, help="most requests queued for admission (1024)")
    p.add_argument("--max-waiting-tokens", type=int,
                   help="most prompt tokens queued for admission (262144)")
    p.add_argument("--max-prefill-chunk", type=int,
                   help="most prompt tokens of one sequence per step (default: the step budget)")
    p.add_argument("--routing-policy", choices=POLICIES,
                   help="serve with this routing policy instead of the model's")
    p.add_argument("--max-experts-per-token", type=int,
                   help="b, the most experts a token takes under capped and threshold "
                        "(default: the model's)")
    p.add_argument("--kernels", choices=("auto", "torch", "triton"),
                   help="Triton kernels (auto: on CUDA devices) or plain torch")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run decode steps eagerly on CUDA (default: captured CUDA graphs)")
    p.add_argument("--cuda-graph-max-batch", type=int,
                   help="largest decode batch run by a CUDA graph (max-num-seqs)")
    p.add_argument("--cuda-graph-limit", type=int,
                   help="most decode graphs held, one per routing-group layout (256)")
    p.add_argument("--expert-timing-every", type=int,
                   help="time each expert's work alone every Nth step, for metrics (64; 0: off)")


def _server_args(p: argparse.ArgumentParser) -> None:
    """Flags mirroring ServerConfig."""
    p.add_argument("--host", help="listen address (127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="gRPC port (50051; 0: any free port)")
    p.add_argument("--reuse-port", action="store_true", default=None,
                   help="share the port with other processes (SO_REUSEPORT); without it a "
                        "port in use is refused at start")
    p.add_argument("--grace-period", type=float,
                   help="seconds live requests get to finish after SIGTERM (30)")
    p.add_argument("--drain-delay", type=float, metavar="S",
                   help="after SIGTERM, seconds of NOT_SERVING while new calls are still taken, "
                        "so balancers stop sending before the port closes (0)")
    p.add_argument("--max-connection-age", type=float, metavar="S",
                   help="send clients GOAWAY after a connection's S seconds, so they reconnect "
                        "and spread over the replicas (default: never)")
    p.add_argument("--max-connection-age-grace", type=float, metavar="S",
                   help="after that GOAWAY, seconds calls on the old connection may still run "
                        "(default: no limit; make it longer than the longest generation)")
    p.add_argument("--max-request-bytes", type=int, help="largest request message (1 MiB)")
    p.add_argument("--default-max-new-tokens", type=int,
                   help="max_new_tokens when a request does not say (16)")
    p.add_argument("--max-stop-sequences", type=int, help="stop sequences per request (8)")
    p.add_argument("--max-stop-sequence-length", type=int,
                   help="characters per stop sequence (256)")
    p.add_argument("--max-top-logprobs", type=int, help="alternatives per token (20)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="report SERVING without a warm-up generation")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=None,
                   help="no Prometheus endpoint")
    p.add_argument("--metrics-host", help="metrics bind address (default: --host's)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (9400; 0: any)")
    p.add_argument("--expert-metrics", choices=("full", "aggregate", "off"),
                   help="per-expert series: each expert, summed per layer, or none (full)")
    p.add_argument("--tls-cert-file", metavar="PEM", help="serve gRPC over TLS with this "
                   "certificate chain (with --tls-key-file)")
    p.add_argument("--tls-key-file", metavar="PEM", help="the TLS certificate's private key")
    p.add_argument("--tls-client-ca-file", metavar="PEM",
                   help="mutual TLS: refuse clients without a certificate signed by this CA")
    p.add_argument("--api-key-file", metavar="PATH",
                   help="require 'authorization: Bearer <key>' with one of the keys in this file "
                        "(one per line); others get UNAUTHENTICATED")
    p.add_argument("--open-services", type=_services, metavar="LIST",
                   help="with --api-key-file, the services that need no key: health, "
                        "reflection, both (health,reflection) or none (default: health)")
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")


def _services(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(s.strip() for s in text.split(",") if s.strip())


def _config(cls: Any, args: argparse.Namespace) -> Any:
    """`cls` from the flags named like its fields; unset flags keep its defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return _config(EngineConfig, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of PROMPT and print it")
    gen.add_argument("prompt", help="the prompt text")
    _engine_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="sampling seed (default: drawn at random)")
    gen.add_argument("--routing-scope", choices=SCOPES, help="default: the model's")

    srv = sub.add_parser("serve", help="serve the model over gRPC until SIGTERM, then drain")
    _engine_args(srv)
    _server_args(srv)
    srv.add_argument("--torch-threads", type=int,
                     help="the engine's torch CPU threads (default: all cores but one, which "
                          "the server's gRPC work and event loop keep; OMP_NUM_THREADS also "
                          "sets it)")
    srv.add_argument("--engine-core", choices=("process", "thread"), default="process",
                     help="where the engine steps: its own process, talking to this one over "
                          "ZMQ (default), or a thread of the server's process (one process, "
                          "one GIL: for debugging)")
    srv.add_argument("--engine-cpus", metavar="LIST",
                     help="pin the engine-core process to these CPUs (e.g. 1-15 or 2,3); "
                          "default: no pinning")
    srv.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                     help="run the MoE experts across N processes on this machine (torch."
                          "distributed, gloo): this one serves, N-1 workers hold the other "
                          "experts (default 1: one process)")
    srv.add_argument("--torchrun", action="store_true",
                     help="expert parallelism across the processes torchrun started (on one or "
                          "more machines): rank 0 serves, the others hold experts")
    srv.add_argument("--placement", metavar="PLAN.json",
                     help="with --expert-parallel N: the expert placement to run, a plan from "
                          "`ecserve plan --devices N --save PLAN.json` (per MoE layer; rank r "
                          "holds the experts whose primary device is r; plans with replicas are "
                          "refused for now). Default: balanced contiguous shares")

    cli = sub.add_parser("client", help="stream a generation from a server to the terminal")
    cli.add_argument("prompt", help="the prompt text")
    _address_arg(cli)
    cli.add_argument("--max-new-tokens", type=int, help="default: the server's")
    cli.add_argument("--min-new-tokens", type=int, default=0)
    cli.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    cli.add_argument("--top-k", type=int, default=0)
    cli.add_argument("--top-p", type=float)
    cli.add_argument("--seed", type=int, help="sampling seed (default: drawn by the server)")
    cli.add_argument("--stop", action="append", default=[], dest="stop_sequences",
                     help="stop sequence (repeatable)")
    cli.add_argument("--routing-scope", choices=SCOPES, help="default: the model's")
    cli.add_argument("--timeout", type=float, help="deadline in seconds")

    hc = sub.add_parser("health", help="exit 0 if the server reports SERVING, else 1")
    _address_arg(hc)
    hc.add_argument("--service", default="", help='service to ask about ("": the server)')
    hc.add_argument("--timeout", type=float, default=5.0, help="seconds (5)")

    top = sub.add_parser("top", help="watch a server's /metrics: per-expert table, latencies")
    top.add_argument("--url", default="http://127.0.0.1:9400/metrics",
                     help="metrics endpoint (http://127.0.0.1:9400/metrics)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (2)")
    top.add_argument("--iterations", type=int, help="scrapes before exiting (default: until ^C)")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--timeout", type=float, default=5.0, help="seconds per scrape (5)")

    bench = sub.add_parser("bench", help="load-test a server: vLLM's serving metrics, targets",
                           description="Load-test a server over gRPC (closed or open loop); "
                           "exit 0, 3 when a target is missed, 1 when the server is down.")
    from ecserve.loadtest.command import add_arguments as bench_arguments  # light: no grpc

    bench_arguments(bench)

    plan = sub.add_parser("plan", help="place experts on devices; print the predicted "
                          "cross-device traffic")
    _plan_args(plan)

    tr = sub.add_parser("train", help="train an expert-choice model on the Python stdlib "
                        "(the default model's recipe) and write its model directory",
                        description="The whole recipe: corpus, tokenizer, training (resumable: "
                        "rerun the same command), export with a model card.")
    from ecserve.train.command import add_arguments as train_arguments  # light: no torch

    train_arguments(tr)

    init = sub.add_parser("init-model", help="copy the default (trained) model's directory to "
                          "DIR; --random: a model of seeded random weights instead")
    init.add_argument("dir")
    init.add_argument("--random", action="store_true",
                      help="write a small model of random weights from a fixed seed (byte "
                           "tokenizer; the same bytes on every machine), for tests")
    init.add_argument("--seed", type=int, help="with --random: the weight seed (2022)")
    return parser


def _plan_args(p: argparse.ArgumentParser) -> None:
    """`ecserve plan` (ecserve/placement/command.py); kept here so the parser needs no torch."""
    p.add_argument("--model", help="model directory (default: the shipped model, ecserve-code)")
    p.add_argument("--devices", type=int, help="devices to place the experts on")
    p.add_argument("--device-memory",
                   help="weight memory per device, e.g. 80GiB, 512MiB, 1e9 (default: unlimited)")
    p.add_argument("--strategy", choices=("balanced", "affinity"), default="affinity",
                   help="balanced: contiguous equal shares; affinity (default): equal shares, "
                        "experts that choose the same tokens on the same device")
    p.add_argument("--replicate", action="store_true",
                   help="copy the hottest experts onto other devices while memory allows")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="file of prompts, one per line, for routing statistics")
    src.add_argument("--synthetic-requests", type=int, default=8,
                     help="random prompts for the routing statistics without --prompts (8)")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="tokens generated per prompt while recording routing (16)")
    p.add_argument("--device", default="cpu", help="where the statistics run is made (cpu)")
    p.add_argument("--seed", type=int, default=0, help="synthetic prompts and planner seed (0)")
    p.add_argument("--save", help="write the placement to this JSON file")
    p.add_argument("--load", help="evaluate a saved placement instead of making one")


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
    print(f"[{counted(len(out.token_ids), 'token')}, finish: {out.finish_reason.value}, "
          f"seed: {out.seed}]",
          file=sys.stderr)
    return 0


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (127.0.0.1:50051)")
    add_client_arguments(p)


def _serve(args: argparse.Namespace) -> int:
    import torch  # OMP_WAIT_POLICY: set for every command by ecserve/__init__.py

    from ecserve.engine.core import CoreSpec, load_engine
    from ecserve.server.app import serve_model

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.torch_threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) - 1)
    if threads is not None and threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {threads}")
    core = None
    if args.engine_core == "process":
        core = CoreSpec(threads, _cpu_list(args.engine_cpus), args.log_level)
        torch.set_num_threads(1)  # this process runs no model: its threads would only idle
    elif args.engine_cpus:
        raise ValueError("--engine-cpus pins the engine-core process: drop --engine-core thread")
    elif threads is not None:
        torch.set_num_threads(threads)
    engine_cfg, server_cfg = _engine_config(args), _config(ServerConfig, args)
    model = args.model or os.environ.get("ECSERVE_MODEL") or None
    if args.expert_parallel <= 1 and not args.torchrun:
        if args.placement:
            raise ValueError("--placement needs --expert-parallel N with N >= 2")
        return serve_model(functools.partial(load_engine, model, engine_cfg), model,
                           server_cfg, core)
    if args.torchrun and args.expert_parallel > 1:
        raise ValueError("--torchrun takes the number of ranks from torchrun; drop "
                         "--expert-parallel")
    from ecserve.parallel.launch import serve_expert_parallel

    return serve_expert_parallel(model, engine_cfg, server_cfg, args.expert_parallel,
                                 args.placement, args.torchrun, core)


def _cpu_list(text: str | None) -> tuple[int, ...] | None:
    """"1-3,6" -> (1, 2, 3, 6); the CPUs must exist here."""
    if not text:
        return None
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"--engine-cpus: {text!r} is not a CPU list like 1-3,6") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise ValueError(f"--engine-cpus: {text!r} names CPUs this process cannot use "
                         f"(it may use {sorted(allowed)})")
    return tuple(sorted(set(cpus)))


def _client(args: argparse.Namespace) -> int:
    from ecserve.client import Client
    from ecserve.v1 import generation_pb2 as pb

    options = {k: getattr(args, k) for k in (
        "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed",
        "stop_sequences", "routing_scope")}
    last = None
    with Client(args.address, timeout=args.timeout, security=client_security(args)) as client:
        for last in client.stream(args.prompt, **options):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None:
        print(f"[{counted(last.generated_token_count, 'token')}, stop: "
              f"{pb.StopReason.Name(last.stop_reason)}, seed: {last.seed}]", file=sys.stderr)
    return 0


def _health(args: argparse.Namespace) -> int:
    from ecserve.client import Client

    with Client(args.address, timeout=args.timeout, security=client_security(args)) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _init_model(args: argparse.Namespace) -> int:
    from ecserve.model.default import RANDOM_SEED, copy_default_model, write_model

    if args.random:
        path = write_model(args.dir, seed=RANDOM_SEED if args.seed is None else args.seed)
    elif args.seed is not None:
        raise ValueError("--seed chooses random weights: it needs --random")
    else:
        path = copy_default_model(args.dir)
    print(f"wrote {path}")
    return 0


def _top(args: argparse.Namespace) -> int:
    from ecserve.top import ScrapeError, run

    iterations = 1 if args.once else args.iterations
    try:
        return run(args.url, args.interval, iterations, timeout=args.timeout)
    except ScrapeError as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ecserve.train.recipe import run

    return run(args, list(argv))


def _plan(args: argparse.Namespace) -> int:
    from ecserve.placement.command import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from ecserve.loadtest.command import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    commands = {"generate": _generate, "serve": _serve, "client": _client, "health": _health,
                "init-model": _init_model, "top": _top, "bench": _bench,
                "plan": _plan, "train": lambda a: _train(a, argv)}
    try:
        return commands[args.command](args)
    except grpc.RpcError as e:
        print(f"ecserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 2
