"""The monitor's operator log: one stamped line per event on stderr, rate-limited where a
peer could repeat a problem at will."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable


def log(message: str) -> None:
    """One line on stderr with a wall-clock stamp (the monitor's operator log)."""
    print(f"{time.strftime('%H:%M:%S')} monitor: {message}", file=sys.stderr, flush=True)


class RateLimitedLog:
    """Logs a problem at most once per ``interval`` seconds, with a count of the suppressed."""

    def __init__(self, interval: float = 1.0, sink: Callable[[str], None] = log) -> None:
        self.interval = interval
        self.sink = sink
        self._last = -math.inf
        self._suppressed = 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        extra = f" (+{self._suppressed} more since last report)" if self._suppressed else ""
        self._suppressed = 0
        self._last = now
        self.sink(message + extra)
