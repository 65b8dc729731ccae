"""The `lhtstream` command: argument parsing (`parser`) and every subcommand's handler.

This module stays light: the console script imports it, then calls `main`, which installs
the start-up signal handler (`service.startup`, standard library only) *before* the
parser's imports (numpy, ZeroMQ: ~0.1-0.3 s), so a SIGTERM at any moment of start-up
exits 0 with a line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """The `lhtstream` command (`parser.main`); ``argv`` None: this process's arguments."""
    if argv is None:  # this process's command, not a call from Python (tests)
        from lhtstream.service.startup import exit_on_stop_signals  # local import: start-up time

        exit_on_stop_signals()
    from lhtstream.cli import parser  # local import: start-up time (after the handler)

    return parser.main(argv)


def build_parser() -> Any:
    """The command's `argparse` parser (`parser.build_parser`)."""
    from lhtstream.cli import parser  # local import: start-up time (after the handler)

    return parser.build_parser()
