"""Flags generated from config dataclasses: each flag's name, type, choices, default and help
come from its field (ecserve/config/fields.py), so none is typed twice. An unset flag keeps
the dataclass's default."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ecserve.config.fields import Flag, choices, field_docs, field_types, strip_optional

Group = argparse.ArgumentParser | argparse._ArgumentGroup


def add_flags(p: Group, cls: type, *, only: Collection[str] | None = None,
              exclude: Collection[str] = (), flags: Mapping[str, Flag] | None = None,
              defaults: Mapping[str, Any] | None = None) -> None:
    """A flag per field of dataclass `cls` (those in `only`, less `exclude`). `flags` overrides
    a field's Flag metadata; `defaults` a field's default, for this command only."""
    docs, hints = field_docs(cls), field_types(cls)
    chosen = [f for f in dataclasses.fields(cls)
              if (only is None or f.name in only) and f.name not in exclude]
    specs = {f.name: (flags or {}).get(f.name) or f.metadata.get("flag") or Flag()
             for f in chosen}
    # A field's doc names its siblings by field name (tls_key_file); help says --tls-key-file.
    options = {f.name: specs[f.name].name or "--" + f.name.replace("_", "-")
               for f in chosen if "_" in f.name and not specs[f.name].positional}
    for f in chosen:
        spec = specs[f.name]
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        doc = re.sub(r"(?<![.\w])[a-z]+(?:_[a-z0-9]+)+\b",
                     lambda m: options.get(m.group(), m.group()), docs[f.name])
        _add(p, f.name, hints[f.name], default, doc, spec,
             override=bool(defaults and f.name in defaults))


def from_flags(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` from the flags named like its fields (and `given`); unset flags keep defaults."""
    hints = field_types(cls)
    values = {f.name: _coerce(hints[f.name], getattr(args, f.name))
              for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def _coerce(tp: Any, value: Any) -> Any:
    """argparse's lists as the field's tuple or dict."""
    base, _ = strip_optional(tp)
    origin = typing.get_origin(base)
    if isinstance(value, list) and origin is tuple:
        return tuple(value)
    if isinstance(value, list) and origin is dict:
        return dict(value)
    return value


def _add(p: Group, name: str, tp: Any, default: Any, doc: str, spec: Flag,
         override: bool) -> None:
    base, _ = strip_optional(tp)
    option = spec.name or "--" + name.replace("_", "-")
    required = default is dataclasses.MISSING
    kwargs: dict[str, Any] = {"default": default if override else argparse.SUPPRESS}
    if required and not spec.positional:
        kwargs["required"] = True
    shown = spec.default_text
    if base is bool and spec.parse is None:
        # Off by default: --x. On by default, or unset (None: decided later): --x and --no-x.
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        shown = shown or ("on" if default is True else None)
    else:
        allowed = choices(base)
        item = typing.get_args(base)[0] if typing.get_origin(base) in (tuple, list) else base
        convert = spec.parse or (type(allowed[0]) if allowed else item)
        kwargs["type"] = _argument_type(convert)
        if allowed:
            kwargs["choices"] = allowed
        if spec.nargs is not None:
            kwargs["nargs"] = spec.nargs
        if spec.repeat:
            kwargs["action"] = "append"
        metavar = spec.metavar or (None if allowed else {int: "N", float: "X"}.get(item))
        if metavar:
            kwargs["metavar"] = metavar
        empty = isinstance(default, (tuple, dict)) and not default
        if shown is None and not required and default is not None and not empty:
            shown = _show(default)
    text = f"{doc} {spec.note}" if spec.note else doc
    if shown:
        stop = "." if text.endswith(".") else ""
        text = f"{text.removesuffix('.')} (default: {shown}){stop}"
    help_text = text.replace("%", "%%")
    if spec.positional:
        kwargs.pop("default")
        action = p.add_argument(name, help=help_text, **kwargs)
    else:
        action = p.add_argument(option, dest=name, help=help_text, **kwargs)
    action.default_text = shown  # type: ignore[attr-defined]  # docs/cli.md shows it


def _argument_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse hides a type's own message; a ValueError's text reaches the user instead."""
    if convert in (int, float, str):
        return convert

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _show(value: Any) -> str:
    """A default as help shows it: 30000000.0 as 3e+07, a tuple as a comma list."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)

