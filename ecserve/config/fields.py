"""Settings declared once: a dataclass field's type gives its choices, its default is the
default, and the string literal under it is its documentation (an attribute docstring, read
from the source by `field_docs`, as vLLM's configs are). The command line's flags and
docs/cli.md are generated from these (ecserve/cli/flags.py), so none of them is typed twice.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

from ecserve.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line where its name and type do not say enough."""

    name: str | None = None  # the flag, e.g. "--stop"; default: --field-name
    metavar: str | None = None
    # The flag's text (a list of texts with nargs) -> the field's value; a ValueError becomes a
    # usage error naming the flag.
    parse: Callable[[Any], Any] | None = None
    nargs: int | str | None = None
    repeat: bool = False  # may be given several times; the values make a tuple
    # How help shows the default, where the value alone would mislead (None meaning "the
    # model's", a unit); default: the value itself.
    default_text: str | None = None
    positional: bool = False
    note: str = ""  # appended to the help: a command-line detail the field's own doc lacks


def flag(**kwargs: Any) -> dict[str, Flag]:
    """Field metadata: `x: int = field(default=1, metadata=flag(metavar="N"))`."""
    return {"flag": Flag(**kwargs)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right under it), whitespace folded;
    inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        assert isinstance(node, ast.ClassDef)
        for stmt, after in zip(node.body, node.body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (tp, False) otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of a Literal type (or `Literal | None`); None for other types."""
    tp, _ = strip_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choices(obj: Any, path: str = "") -> None:
    """ConfigError naming the first field whose value is not among its Literal choices."""
    for name, tp in field_types(type(obj)).items():
        allowed, value = choices(tp), getattr(obj, name)
        if allowed is not None and value is not None:
            check_choice(f"{path}.{name}" if path else name, value, allowed)


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}",
                          field=name)


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}",
                          field=name)
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}", field=name)
