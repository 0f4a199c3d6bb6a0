"""`ecserve bench`: its flags, and the run -> report -> targets -> files sequence.

Exit codes: 0 done (every target met), 3 a target missed, 1 the server could not be reached
(or another runtime failure), 2 a usage error (argparse's, or a bad value/targets file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ecserve.loadtest.config import LoadTestConfig, parse_slos
from ecserve.loadtest.targets import FLAG_TARGETS, TARGETS, check_targets, evaluate, load_targets
from ecserve.security import add_client_arguments, client_security

EXIT_TARGET_MISSED = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (127.0.0.1:50051)")
    add_client_arguments(p)
    load = p.add_argument_group("load (one of --concurrency or --request-rate; default: "
                                "closed loop, concurrency 1)")
    load.add_argument("--concurrency", type=int, metavar="N",
                      help="closed loop: N workers, each sending when its last request ends")
    load.add_argument("--request-rate", type=float, metavar="R",
                      help="open loop: requests/s with gamma arrivals; inf: all at once")
    load.add_argument("--burstiness", type=float, default=1.0, metavar="B",
                      help="gamma shape of the arrival gaps (1: Poisson; <1 burstier)")
    load.add_argument("--num-requests", type=int, default=100, metavar="N",
                      help="requests to send (100)")
    load.add_argument("--duration", type=float, default=600.0, metavar="S",
                      help="stop sending after this many seconds (600)")
    load.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                      help="seconds in-flight requests get after sending stops, then they are "
                           "cancelled and counted as failed (30)")
    load.add_argument("--max-in-flight", type=int, default=1024, metavar="N",
                      help="most requests in flight; the open loop waits past it (1024)")
    load.add_argument("--warmup-requests", type=int, default=0, metavar="N",
                      help="requests sent first, not measured (0)")
    load.add_argument("--timeout", type=float, metavar="S", help="per-request deadline in seconds")
    load.add_argument("--seed", type=int, default=0, metavar="N",
                      help="lengths, prompts and arrivals (0)")
    work = p.add_argument_group("requests")
    work.add_argument("--input-len", type=int, metavar="N", help="prompt tokens (128)")
    work.add_argument("--output-len", type=int, metavar="N",
                      help="generated tokens, EOS ignored (128)")
    work.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"),
                      help="uniform prompt lengths")
    work.add_argument("--output-len-range", type=int, nargs=2, metavar=("LO", "HI"),
                      help="uniform output lengths")
    work.add_argument("--prompts-file", metavar="PATH",
                      help='JSONL {"prompt": ..., "max_new_tokens": N} or one text prompt a line')
    work.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="0: greedy (default)")
    work.add_argument("--routing-scope", choices=("batch", "sequence"),
                      help="default: the model's")
    tg = p.add_argument_group("targets (exit 3 when one is missed)")
    tg.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=[],
                    help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    tg.add_argument("--targets", metavar="PATH",
                    help="JSON or TOML file of targets (flags override it)")
    for name in FLAG_TARGETS:
        metric, op, unit = TARGETS[name]
        tg.add_argument("--" + name.replace("_", "-"), type=float, metavar="X",
                        help=f"{metric} {op} this{' (' + unit + ')' if unit else ''}")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH",
                     help="write metrics, config, machine and server info here")
    out.add_argument("--save-requests", action="store_true",
                     help="include per-request records in --json")
    out.add_argument("--metrics-url", metavar="URL",
                     help="server's Prometheus endpoint for its memory (http://HOST:9400/metrics"
                          '; "" to skip)')
    out.add_argument("--plot-dir", metavar="DIR",
                     help="write latency_cdf.png and throughput.png here")
    out.add_argument("--progress", action="store_true", default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    out.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    return LoadTestConfig(
        address=args.address, concurrency=args.concurrency, request_rate=args.request_rate,
        burstiness=args.burstiness, num_requests=args.num_requests, duration=args.duration,
        drain_timeout=args.drain_timeout, input_len=args.input_len, output_len=args.output_len,
        input_len_range=tuple(args.input_len_range) if args.input_len_range else None,
        output_len_range=tuple(args.output_len_range) if args.output_len_range else None,
        prompts_file=args.prompts_file, warmup_requests=args.warmup_requests,
        max_in_flight=args.max_in_flight, timeout=args.timeout, seed=args.seed,
        temperature=args.temperature, routing_scope=args.routing_scope,
        metrics_url=args.metrics_url, goodput=parse_slos(args.goodput), progress=progress,
    )


def targets_from_args(args: argparse.Namespace) -> dict[str, float]:
    targets = load_targets(args.targets) if args.targets else {}
    flags = {n: getattr(args, n) for n in FLAG_TARGETS if getattr(args, n) is not None}
    return {**targets, **check_targets(flags, "flags")}


def run(args: argparse.Namespace) -> int:
    """Raises ValueError for usage errors (the caller's exit 2)."""
    from ecserve.loadtest.output import check_writable, result_document, write_json
    from ecserve.loadtest.report import format_report
    from ecserve.loadtest.run import run_load_test
    from ecserve.loadtest.runner import ServerUnreachable

    cfg = config_from_args(args)
    cfg.validate()
    targets = targets_from_args(args)
    if "min_goodput" in targets and not cfg.goodput:
        raise ValueError("target min_goodput needs --goodput SLOs (e.g. --goodput ttft:500)")
    if args.plot_dir:
        from ecserve.loadtest.plots import require_matplotlib

        try:
            require_matplotlib()
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    if args.json:
        check_writable("--json", Path(args.json).parent)
    if args.plot_dir:
        check_writable("--plot-dir", Path(args.plot_dir))
    try:
        result = run_load_test(cfg, security=client_security(args))
    except ServerUnreachable as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 1
    print(format_report(result, cfg))
    verdicts = evaluate(targets, result.metrics) if targets else None
    for v in verdicts or ():
        print(v.line())
    if args.json:
        write_json(args.json, result_document(result, cfg, verdicts, args.save_requests))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot_dir:
        from ecserve.loadtest.plots import write_plots

        for path in write_plots(result.requests, args.plot_dir, f"({cfg.address})"):
            print(f"wrote {path}", file=sys.stderr)
    if verdicts and not all(v.passed for v in verdicts):
        return EXIT_TARGET_MISSED
    return 0
