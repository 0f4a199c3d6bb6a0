"""The examples of README.md and docs/*.md, run as a user would run them (the rules:
docs/development.md, "Examples in the docs are tests").

A page's fenced blocks run in order, in a fresh directory of their own that links the
repository's files (as a checkout has them), so `python bench/...` runs:
- ```sh: each command (`\\` continues a line, `#` comments) runs in bash. `ecserve serve ...`
  starts a server in the background, as in another terminal, ready once /readyz (or gRPC
  health) says so; it gets SIGTERM at the next `ecserve serve` or at the page's end, and must
  then exit 0.
- ```sh norun: REASON: not run (a GPU, Docker, hours of training...); every `ecserve` command
  in it must still parse.
- ```python: run as a script.
- ```text: the output (stdout and stderr as a terminal interleaves them) of the last command
  of the block before it; every number matches any number, a line `...` any lines. ```text
  exact: compared as it is. ```text exit=N: that command exits N (otherwise it must exit 0).
- ```json, ```yaml, ```toml: file contents, which must parse. A block without an info string
  is a diagram: it must hold no command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT = 300.0  # seconds a command may take (a served bench run included)
SERVE_TIMEOUT = 120.0  # seconds a server may take to say it is ready
# Run by CI around this very test; running it here would recurse.
NOT_HERE = {"bash .ci/run": "it is CI itself"}
NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d+)?|\.\d+)([eE][-+]?\d+)?")
FENCE = re.compile(r"^(```+)(.*)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    info: str  # what follows the language on the fence line
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block")
        lang, _, rest = info.partition(" ")
        out.append(Block(page, i + 1, lang, rest.strip(), "\n".join(lines[i + 1:end])))
        i = end + 1
    return out


def commands(text: str) -> list[str]:
    """A sh block's commands: continuation lines joined, comment lines dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        out.append(current.strip())
        current = ""
    if current:
        out.append(current.strip())
    return out


def shell_words(command: str) -> list[str]:
    """A command's words up to its first redirection, pipe or list operator."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    try:
        for word in lexer:
            if set(word) <= set("();<>|&"):
                break
            words.append(word)
    except ValueError:  # unbalanced quotes: not a command this module reads
        return []
    return words


def ecserve_args(command: str) -> list[str] | None:
    """The arguments of an `ecserve ...` command (also `.venv/bin/ecserve`, `python -m
    ecserve`); None for other commands."""
    words = shell_words(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] and Path(words[0]).name == "ecserve" and not words[0].endswith("/"):
        return words[1:]
    if words[:3] in (["python", "-m", "ecserve"], ["python3", "-m", "ecserve"]):
        return words[3:]
    return None


def parses(args: list[str]) -> str | None:
    """None when `ecserve ARGS` parses; else argparse's complaint."""
    import io

    from ecserve.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip()
    return None


def _lines(text: str) -> list[str]:
    """As a reader sees them: no trailing spaces, no blank lines around."""
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def skeleton(text: str) -> list[str]:
    """Lines with every number as #, spaces folded (column widths follow the numbers)."""
    return [" ".join(NUMBER.sub("#", line).split()) for line in text.strip("\n").splitlines()]


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; an expected `...` matches any run of lines (none included)."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


@dataclass
class Ran:
    command: str
    returncode: int
    output: str
    checked: bool = False  # a ```text block saw it (then its exit code was checked there)


@dataclass
class PageRun:
    """One page's examples, in order, in `cwd`."""

    cwd: Path
    env: dict[str, str]
    server: subprocess.Popen[bytes] | None = None
    server_command: str = ""
    last: Ran | None = None
    log: list[str] = field(default_factory=list)

    def run(self, block: Block) -> None:
        if block.lang == "sh" and block.info.startswith("norun"):
            self.norun(block)
        elif block.lang in ("sh", "bash", "shell", "console"):
            assert block.lang == "sh", f"{block.where}: write ```sh"
            for command in commands(block.text):
                self.sh(block, command)
        elif block.lang == "python":
            self.settle()
            self.last = self.execute(block, [sys.executable, "-c", block.text], "python")
        elif block.lang == "text":
            self.compare(block)
        elif block.lang in ("json", "yaml", "toml"):
            self.data(block)
        elif block.lang == "":
            bad = [c for c in commands(block.text) if ecserve_args(c) is not None]
            assert not bad, f"{block.where}: a command in a block without a language: {bad}"
        else:
            raise AssertionError(f"{block.where}: unknown block language {block.lang!r}")

    def norun(self, block: Block) -> None:
        reason = block.info.removeprefix("norun").lstrip(":").strip()
        assert reason, f"{block.where}: say why it cannot run: ```sh norun: REASON"
        for command in commands(block.text):
            args = ecserve_args(command)
            if args is None:
                args = _embedded_ecserve(command)
            if args is not None:
                problem = parses(args)
                assert problem is None, f"{block.where}: `{command}` does not parse: {problem}"

    def sh(self, block: Block, command: str) -> None:
        if " ".join(shell_words(command)) in NOT_HERE:
            return
        args = ecserve_args(command)
        if args is not None:
            problem = parses(args)
            assert problem is None, f"{block.where}: `{command}` does not parse: {problem}"
        if args is not None and args[:1] == ["serve"]:
            self.start_server(block, command, args)
            return
        self.settle()
        self.last = self.execute(block, ["bash", "-c", command], command)

    def execute(self, block: Block, argv: list[str], what: str) -> Ran:
        # A process group of its own, so a command past its time is stopped with whatever it
        # started (SIGTERM first: a script cleans up after itself, then SIGKILL).
        proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise AssertionError(f"{block.where}: `{what}` ran past {COMMAND_TIMEOUT} s") from None
        output = out.decode("utf-8", "replace")
        self.log.append(f"$ {what}\n{output}")
        return Ran(what, proc.returncode, output)

    def settle(self) -> None:
        """The last command must have succeeded, unless a ```text exit=N block checked it."""
        if self.last is not None and not self.last.checked and self.last.returncode != 0:
            raise AssertionError(f"`{self.last.command}` exited {self.last.returncode}:\n"
                                 f"{self.last.output}")

    def compare(self, block: Block) -> None:
        assert self.last is not None and not self.last.checked, (
            f"{block.where}: output with no command before it")
        ran, self.last.checked = self.last, True
        want = re.search(r"exit=(\d+)", block.info)
        code = int(want.group(1)) if want else 0
        assert ran.returncode == code, (f"{block.where}: `{ran.command}` exited "
                                        f"{ran.returncode}, not {code}:\n{ran.output}")
        if "exact" in block.info.split():
            assert _lines(ran.output) == _lines(block.text), (
                f"{block.where}: `{ran.command}` printed:\n{ran.output}")
        else:
            assert matches(skeleton(block.text), skeleton(ran.output)), (
                f"{block.where}: `{ran.command}` printed (numbers aside, it must match the "
                f"block):\n{ran.output}")

    def data(self, block: Block) -> None:
        if block.lang == "json":
            json.loads(block.text)
        elif block.lang == "yaml":
            import yaml

            yaml.safe_load(block.text)
        else:
            import tomllib

            tomllib.loads(block.text)

    def start_server(self, block: Block, command: str, args: list[str]) -> None:
        self.settle()
        self.stop_server()
        from ecserve.cli import build_parser

        parsed = build_parser().parse_args(args)
        host = getattr(parsed, "host", "127.0.0.1")
        assert host in ("127.0.0.1", "localhost", "::1"), (
            f"{block.where}: examples serve on loopback only, not {host}")
        log = self.cwd / f"serve-{block.line}.log"
        with open(log, "wb") as out:
            self.server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.cwd,
                                           env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        self.server_command = command
        metrics = getattr(parsed, "metrics", True)
        port = getattr(parsed, "metrics_port" if metrics else "port",
                       9400 if metrics else 50051)
        end = time.monotonic() + SERVE_TIMEOUT
        while not _ready(host, port, metrics):
            if self.server.poll() is not None or time.monotonic() > end:
                self.server.kill()
                raise AssertionError(f"{block.where}: `{command}` did not become ready:\n"
                                     f"{log.read_text(errors='replace')}")
            time.sleep(0.2)

    def stop_server(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        os.killpg(server.pid, signal.SIGTERM)
        try:
            code = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise AssertionError(f"`{self.server_command}` did not drain after SIGTERM") from None
        assert code == 0, f"`{self.server_command}` exited {code} after SIGTERM"

    def close(self) -> None:
        try:
            self.settle()
        finally:
            if self.server is not None and self.server.poll() is None:
                try:
                    self.stop_server()
                finally:
                    if self.server is not None:
                        os.killpg(self.server.pid, signal.SIGKILL)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's group (a script cleans up after itself), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
            return


def _embedded_ecserve(command: str) -> list[str] | None:
    """The ecserve arguments inside a launcher's command (`docker run IMAGE serve ...`,
    `torchrun ... -m ecserve serve ...`)."""
    words = shell_words(command)
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["ecserve"]:
        return words[words.index("-m") + 2:]
    return None


def _ready(host: str, port: int, metrics: bool) -> bool:
    if metrics:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    from ecserve.client import Client

    try:
        with Client(f"{host}:{port}", timeout=2) as c:
            return c.health() == "SERVING"
    except Exception:
        return False


def environment() -> dict[str, str]:
    """A user's shell: this interpreter's bin first (ecserve, grpcurl), nothing of the test run's
    own ecserve settings but eager decode steps (a compile per example would take minutes; a
    newcomer's compiled `ecserve serve` is tested in test_compiled_decode.py), output
    unbuffered so stdout and stderr interleave as in a terminal."""
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("ECSERVE_") or k == "ECSERVE_COMPILED_DECODE")
           and k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               COLUMNS="100", PYTHONIOENCODING="utf-8")
    return env


def run_page(page: Path, cwd: Path) -> list[str]:
    """Run every example of `page` in `cwd`; returns the log of what ran."""
    # A checkout: the repository's files (bench/, protos/, ...), and as README's
    # `.venv/bin/ecserve` the environment these tests run in.
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv") and not entry.name.startswith((".", "__")):
            (cwd / entry.name).symlink_to(entry)
    (cwd / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    run = PageRun(cwd, environment())
    try:
        for block in blocks(page):
            run.run(block)
    finally:
        run.close()
    return run.log
