"""A clean exit on SIGINT/SIGTERM from a process's first instant, before any service runs.

Python's default SIGTERM kills a process without a word, and a service installs its own
handler only once its imports (numpy, ZeroMQ, Numba: ~0.3-1 s) are done: a SIGTERM in
that window ended the monitor with no message (issue 20 item 6). `exit_on_stop_signals`,
called before those imports (it imports only the standard library), makes such a signal
print one line and exit 0; a service then replaces the handler with its own (`serve`
stops its loop, publishes a last status and closes the journal).
"""

from __future__ import annotations

import os
import signal
from typing import Any

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"lhtstream: {name} during start-up: stopped\n".encode())
    raise SystemExit(0)


def exit_on_stop_signals() -> None:
    """From now on until a service installs its own handler, SIGINT or SIGTERM print one
    line on stderr and exit 0 (SystemExit, so ``finally`` blocks still run)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _exit_now)
