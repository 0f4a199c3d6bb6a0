"""The `ecserve` command: one module per subcommand (ecserve/cli/<name>.py, each with HELP,
add_arguments and run), dispatched here. Errors in what the user gave (a config value, a
request, a file, an unreachable server) print one line; anything else is a bug and keeps its
traceback. Every subcommand and flag: docs/cli.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from ecserve import __version__
from ecserve.cli import bench, client, generate, health, init_model, plan, serve, top, train
from ecserve.errors import UserError

COMMANDS: dict[str, ModuleType] = {
    "serve": serve, "generate": generate, "client": client, "health": health, "top": top,
    "bench": bench, "plan": plan, "train": train, "init-model": init_model,
}
EXIT_USAGE = 2  # argparse's code for a bad command line; ours for any user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecserve", description="An inference serving engine for expert-choice "
        "Mixture-of-Experts language models. Every command and flag: docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"ecserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given (`ecserve train` records it)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("ecserve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, OSError) as e:
        print(f"ecserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not _is_rpc_error(e):
            raise
        # The server's answer (or the network's): one line; 1, as `health` answers a server
        # that is not serving.
        print(f"ecserve: error: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


def _is_rpc_error(e: Exception) -> bool:
    """grpc.RpcError, without importing grpc for commands that never load it."""
    grpc = sys.modules.get("grpc")
    return grpc is not None and isinstance(e, grpc.RpcError)
