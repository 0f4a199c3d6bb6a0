"""Stop sequences: find them in the streamed text without ever streaming part of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Watches a request's text deltas for its stop sequences.

    Text that could still grow into a stop sequence is held back, so a client never receives
    the first half of a stop sequence that is then cut off.
    """

    def __init__(self, stops: Sequence[str], include: bool) -> None:
        self.stops = tuple(stops)
        self.include = include  # keep the matched stop sequence at the end of the text
        self._longest = max(map(len, self.stops), default=0)
        self._held = ""

    def feed(self, text: str, can_stop: bool = True) -> tuple[str, str | None]:
        """(text safe to emit, the stop sequence matched or None). After a match, stop feeding.

        With `can_stop` False (min_new_tokens not reached yet) nothing matches, but text is
        still held back so a stop sequence straddling that point is found on the next feed.
        """
        buf = self._held + text
        if can_stop:
            hits = [(i, -len(s), s) for s in self.stops if (i := buf.find(s)) >= 0]
            if hits:
                i, _, stop = min(hits)  # the earliest, the longest of those starting there
                self._held = ""
                return buf[:i] + (stop if self.include else ""), stop
        keep = self._prefix_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        """The held-back text, at the end of generation for another reason."""
        out, self._held = self._held, ""
        return out

    def _prefix_len(self, buf: str) -> int:
        """Length of the longest end of `buf` that is the start of a stop sequence."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
