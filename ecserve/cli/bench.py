"""Load-test a running server over gRPC (closed or open loop) and report vLLM's serving
metrics: TTFT, ITL, TPOT, E2EL, throughput, goodput. Exit 0 when done and every target is
met, 3 when a target is missed, 1 when the server cannot be reached, 2 for a usage error,
130 after Ctrl-C (the report and --json still cover what was measured)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config.fields import flag
from ecserve.errors import ConfigError
from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.targets import FLAG_TARGETS, TARGETS, check_targets, load_targets
from ecserve.security import ClientOptions

HELP = "load-test a server: vLLM's serving metrics, targets"
EXIT_TARGET_MISSED = 3
LOAD = ("concurrency", "request_rate", "burstiness", "num_requests", "duration",
        "drain_timeout", "max_in_flight", "warmup_requests", "timeout", "seed")
REQUESTS = ("input_len", "output_len", "input_len_range", "output_len_range", "prompts_file",
            "shared_prefix_len", "num_prefixes", "temperature", "routing_scope")


@dataclass(frozen=True)
class BenchOutputs:
    """What `ecserve bench` writes beside its report, and the file of targets it checks."""

    targets: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """A JSON or TOML file of targets (the flags below override it)."""
    json: str | None = field(default=None, metadata=flag(metavar="PATH"))
    """Write the metrics, errors, targets, config, machine and server info here."""
    save_requests: bool = False
    """Include a record per request in --json."""
    plot_dir: str | None = field(default=None, metadata=flag(metavar="DIR"))
    """Write latency_cdf.png and throughput.png here (needs matplotlib)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, ClientOptions)
    add_flags(p, LoadTestConfig, only=("protocol",))
    add_flags(p.add_argument_group("load (closed loop of 1 worker unless --concurrency or "
                                   "--request-rate)"), LoadTestConfig, only=LOAD)
    add_flags(p.add_argument_group("requests"), LoadTestConfig, only=REQUESTS)
    targets = p.add_argument_group("targets (exit 3 when one is missed)")
    add_flags(targets, LoadTestConfig, only=("goodput",))
    add_flags(targets, BenchOutputs, only=("targets",))
    for name in FLAG_TARGETS:  # TARGETS is their one definition: metric, bound, unit
        metric, op, unit = TARGETS[name]
        targets.add_argument("--" + name.replace("_", "-"), type=float, metavar="X",
                             default=argparse.SUPPRESS,
                             help=f"{metric} {op} this{' (' + unit + ')' if unit else ''}")
    out = p.add_argument_group("output")
    add_flags(out, BenchOutputs, exclude=("targets",))
    add_flags(out, LoadTestConfig, only=("metrics_url", "progress"))


def run(args: argparse.Namespace) -> int:
    from ecserve.loadtest.output import check_writable, result_document, write_json
    from ecserve.loadtest.report import format_report
    from ecserve.loadtest.run import run_load_test
    from ecserve.loadtest.targets import evaluate
    from ecserve.loadtest.transport import ServerUnreachable

    client, outputs = from_flags(ClientOptions, args), from_flags(BenchOutputs, args)
    cfg = from_flags(LoadTestConfig, args, address=client.address)
    cfg.validate()
    targets = load_targets(outputs.targets) if outputs.targets else {}
    targets.update(check_targets({n: getattr(args, n) for n in FLAG_TARGETS if hasattr(args, n)},
                                 "flags"))
    if "min_goodput" in targets and not cfg.goodput:
        raise ConfigError("target min_goodput needs --goodput SLOs (e.g. --goodput ttft:500)",
                          field="goodput")
    if outputs.plot_dir:
        from ecserve.loadtest.plots import require_matplotlib

        require_matplotlib()
        check_writable("--plot-dir", Path(outputs.plot_dir))
    if outputs.json:
        check_writable("--json", Path(outputs.json).parent)
    try:
        result = run_load_test(cfg, security=client.security())
    except ServerUnreachable as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return 1
    print(format_report(result, cfg))
    verdicts = evaluate(targets, result.metrics) if targets else None
    for v in verdicts or ():
        print(v.line())
    if outputs.json:
        write_json(outputs.json, result_document(result, cfg, verdicts, outputs.save_requests))
        print(f"wrote {outputs.json}", file=sys.stderr)
    if outputs.plot_dir:
        from ecserve.loadtest.plots import write_plots

        for path in write_plots(result.requests, outputs.plot_dir, f"({cfg.target()})"):
            print(f"wrote {path}", file=sys.stderr)
    if result.stopped_by == "interrupt":  # reported and written: now the usual Ctrl-C exit
        raise KeyboardInterrupt
    if verdicts and not all(v.passed for v in verdicts):
        return EXIT_TARGET_MISSED
    return 0
