"""JSON (a checkpoint's config.json) -> config dataclasses, naming the dotted key of anything
wrong: unknown and missing keys, wrong types, values outside a Literal's choices."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from ecserve.config.fields import check_choice, field_types, strip_optional
from ecserve.errors import ConfigError


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from JSON data, naming the dotted key of anything wrong."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}", field=path)
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{path}.{k}") if path else (lambda k: k)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(dotted, unknown))}",
                          field=dotted(unknown[0]))
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(map(dotted, missing))}",
                          field=dotted(missing[0]))
    kwargs = {k: _parse_value(hints[k], v, dotted(k)) for k, v in data.items()}
    return cls(**kwargs)


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    inner, optional = strip_optional(tp)
    if optional:
        return None if value is None else _parse_value(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}", field=path)
        item = typing.get_args(tp)[0]
        return tuple(_parse_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        _parse_value(type(allowed[0]), value, path)
        check_choice(path, value, allowed)
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} at {path}")
    if not ok:
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} "
                          f"{value!r}", field=path)
    return float(value) if tp is float else value
