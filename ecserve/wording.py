"""Counted nouns for messages and logs: "1 token", "2 tokens"."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1 (regular English plurals only)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
