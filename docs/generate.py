"""Generate the docs pages made from the code and the results, or check they are current.

    python docs/generate.py           # write docs/cli.md and docs/benchmarks.md
    python docs/generate.py --check   # exit 1 naming the pages that differ (run by the tests)

docs/cli.md comes from `ecserve`'s argument parser, whose flags come from the config
dataclasses (ecserve/cli/flags.py); docs/benchmarks.md from bench/results/*.json
(bench/tables.py). Neither is edited by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

CLI_HEADER = """# Command line

Every `ecserve` subcommand and flag, with its default. This page is generated from the code by
`python docs/generate.py` (each flag comes from one documented field of a config dataclass:
[development](development.md)); `ecserve COMMAND --help` prints the same. Exit codes: 0 done,
2 a usage error or bad input (one line on standard error), 130 interrupted (Ctrl-C); `serve`,
`health`, `top` and `bench` add their own, below."""


def cli_page() -> str:
    from ecserve import __version__
    from ecserve.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [CLI_HEADER, "", "| command | what it does |", "|---|---|"]
    out += [f"| [`ecserve {name}`](#ecserve-{name}) | {helps[name]} |" for name in sub.choices]
    out += ["", f"`ecserve --version` prints the version (`ecserve {__version__}`)."]
    for name, p in sub.choices.items():
        out += ["", f"## ecserve {name}", "", _fold(p.description or helps[name])]
        for group in p._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = group.title or "options"
            out += ["", f"**{title[0].upper() + title[1:]}**", "",
                    "| flag | default | meaning |", "|---|---|---|"]
            out += [_row(a) for a in actions]
    return "\n".join(line for i, line in enumerate(out)
                     if line or not (i and out[i - 1] == "")) + "\n"


def _row(a: argparse.Action) -> str:
    shown = getattr(a, "default_text", None)
    text = a.help or ""
    if shown:
        text = text.replace(f" (default: {shown})", "")
    elif isinstance(a, argparse._StoreTrueAction):
        shown = "off"
    elif a.required and a.option_strings:
        shown = "required"
    flag = " \\| ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
    if a.option_strings and a.nargs != 0:
        metavar = a.metavar or ("{" + ",".join(map(str, a.choices)) + "}" if a.choices
                                else a.dest.upper())
        metavar = " ".join(metavar) if isinstance(metavar, tuple) else metavar
        flag = f"`{a.option_strings[-1]} {metavar}`".replace(" `", "`")
        if len(a.option_strings) > 1:
            flag = " ".join(f"`{o}`" for o in a.option_strings[:-1]) + " " + flag
    if a.nargs in ("+", "*") and a.option_strings:
        flag += " ..."
    if isinstance(a, argparse._AppendAction):
        text += "" if "Repeatable" in text else " Repeatable."
    text = text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    cells = [flag, f"`{shown}`" if shown else "", text]
    return "| " + " | ".join(cells) + " |"


def _fold(text: str) -> str:
    """A docstring's paragraphs as Markdown prose."""
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()))


def benchmarks_page() -> str:
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    assert spec is not None and spec.loader is not None
    tables = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses ask
    spec.loader.exec_module(tables)
    return tables.render(ROOT / "bench" / "results")


PAGES: dict[str, Callable[[], str]] = {"cli.md": cli_page, "benchmarks.md": benchmarks_page}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed pages instead of writing them")
    args = parser.parse_args()
    stale = []
    for name, make in PAGES.items():
        text, path = make(), DOCS / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(f"docs/{name}")
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote docs/{name}")
    if stale:
        print("out of date (run python docs/generate.py): " + ", ".join(stale))
        return 1
    if args.check:
        print("generated pages are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
