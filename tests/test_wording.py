"""Counted nouns in messages."""

from ecserve.wording import counted


def test_counted():
    assert counted(1, "token") == "1 token"
    assert [counted(n, "prompt token") for n in (0, 2)] == ["0 prompt tokens", "2 prompt tokens"]
