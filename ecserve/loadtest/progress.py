"""The load test's progress bar on stderr: tqdm (as `ecserve train`'s), with failures and
requests in flight beside the count."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, label: str = "bench", stream: TextIO | None = None) -> None:
        # Drawn even when the stream is no terminal: --progress asked for it.
        self._bar = tqdm(total=total, desc=label, unit="req", file=stream or sys.stderr,
                         mininterval=0.1, dynamic_ncols=True, leave=True)

    def update(self, done: int, failed: int, in_flight: int, force: bool = False) -> None:
        self._bar.set_postfix(failed=failed, in_flight=in_flight, refresh=False)
        self._bar.update(done - self._bar.n)
        if force:
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
