"""What `generate` and `client` share, so the offline and the served command take the same
prompts, flags, defaults and rules."""

from __future__ import annotations

import argparse
import os
import sys

from ecserve.cli.flags import add_flags, from_flags
from ecserve.config.fields import Flag
from ecserve.errors import ConfigError, RequestError
from ecserve.request import Request, SamplingParams

# A terminal user wants a continuation worth reading; a request without max_new_tokens still
# gets the API's default (SamplingParams, the server's --default-max-new-tokens).
CLI_MAX_NEW_TOKENS = 64
SAMPLING_FLAGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed",
                  "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "stop_sequences")
PROMPT_HELP = "the text to continue; - reads it from standard input"
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` as a newline, a tab and a backslash: a shell passes "\n" as two
    characters. Any other backslash stays as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("generation")
    add_flags(group, SamplingParams, only=SAMPLING_FLAGS,
              defaults={"max_new_tokens": CLI_MAX_NEW_TOKENS},
              flags={"stop_sequences": Flag(name="--stop", metavar="TEXT", repeat=True,
                                            parse=unescape, note="Repeatable; \\n, \\t and "
                                            "\\\\ stand for a newline, a tab and a backslash.")})
    add_flags(group, Request, only=("routing_scope",))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams: checked here, by the rules the engine applies."""
    return from_flags(SamplingParams, args)


def routing_scope(args: argparse.Namespace) -> str | None:
    """--routing-scope; None: the model's."""
    return getattr(args, "routing_scope", None)


def read_prompt(arg: str) -> str:
    """A prompt argument as text: `-` reads standard input. Arguments reach Python as the
    bytes the shell gave, so text that is not UTF-8 (`$'\\xff'`) is refused here, as the server
    refuses it, and an empty prompt too."""
    raw = sys.stdin.buffer.read() if arg == "-" else os.fsencode(arg)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("prompt", f": not valid UTF-8 (byte {raw[e.start]:#04x} at offset "
                                     f"{e.start})") from None
    if not text:
        raise RequestError("prompt", ": empty (give the text to continue)")
    return text


def read_prompts(args: list[str]) -> list[str]:
    if args.count("-") > 1:
        raise ConfigError("prompt: - (standard input) may be given once", field="prompt")
    return [read_prompt(a) for a in args]
