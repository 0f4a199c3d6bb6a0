"""Errors in what a user gave (a flag, a config key, a file, a request), apart from bugs.

The command line prints a UserError as one line and exits 2; anything else keeps its
traceback. Both kinds below also subclass ValueError, which callers of the library catch.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as one line, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or invalid. The message names it; `field`
    holds its dotted name (`routing.group_size`, `max_model_len`) where one field is at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return type(self), (str(self), self.field)


class RequestError(UserError, ValueError):
    """A request the engine cannot serve as given. `field` is the engine's name for the field
    at fault and the message starts with it, so a protocol can name its own field instead
    (`renamed`) without parsing the text."""

    def __init__(self, field: str, rest: str) -> None:
        super().__init__(field + rest)
        self.field, self.rest = field, rest

    def renamed(self, name: str) -> str:
        """The message with the field called `name` (e.g. the proto's `stopping.seed`)."""
        return name + self.rest

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.field, self.rest)
