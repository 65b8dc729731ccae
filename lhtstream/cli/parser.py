"""The `lhtstream` command: a thin argparse layer over the library.

Each subcommand parses its options and calls one library function; all the
work lives in the module named after the concept. Errors the user can fix are
printed as one line (`lhtstream: error: ...`) with exit code 2, never as a
traceback.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

import zmq

from lhtstream import __version__
from lhtstream.base.errors import LhtstreamError
from lhtstream.base.selection import parse_types
from lhtstream.io.protocol import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_PUBLISH_ENDPOINT,
    StreamSelection,
)
from lhtstream.service.startup import exit_on_stop_signals

# ---------------------------------------------------------------- option values


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit 2), not usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    """An argparse ``type`` accepting ``kind`` (int or float) within lo..hi (None: open)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            fmt = "d" if kind is int else "g"
            bounds = (f"{lo:{fmt}}..{hi:{fmt}}" if lo is not None and hi is not None
                      else f">= {lo:{fmt}}" if lo is not None else f"<= {hi:{fmt}}")
            raise argparse.ArgumentTypeError(f"{text} is out of range (allowed: {bounds})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _rate(text: str) -> str:
    if text.strip().lower() == "max":
        return "max"
    _number(float, 0.001, MAX_RATE)(text)
    return text


def _checked_by(parse: Any) -> Any:
    """An argparse ``type`` keeping the text once ``parse(text)`` accepts it; its
    LhtstreamError becomes argparse's one-line error."""

    def check(text: str) -> str:
        try:
            parse(text)
        except LhtstreamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


_types = _checked_by(parse_types)
_streams = _checked_by(StreamSelection)


def _endpoint(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    return text


def _curve_options(p: argparse.ArgumentParser, binds: bool, connects: bool) -> None:
    """--curve-* options (io.curve): CURVE on every socket of the subcommand when given."""
    p.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="this process's key pair (NAME.key_secret from `lhtstream keys`): "
                   "encrypt and authenticate every socket with CURVE (default: plain)")
    if connects:
        p.add_argument("--curve-server-key", default=None, metavar="FILE",
                       help="public key (NAME.key) of what this process connects to")
    else:
        p.set_defaults(curve_server_key=None)
    if binds:
        p.add_argument("--curve-clients", default=None, metavar="DIR",
                       help="folder of the public keys (NAME.key) allowed to connect")
    else:
        p.set_defaults(curve_clients=None)


MAX_RATE = 1_000_000.0  #: frames/s per stream a replay is asked for at most
_SECONDS = _number(float, 0.001, 7 * 24 * 3600.0)  # timeouts, durations: up to a week
_COUNT = _number(int, 1)


# ---------------------------------------------------------------- parser


_WORKERS = _number(int, 1, 256)  # offline worker processes


def _add_workers(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=_WORKERS, default=None, metavar="N",
                   help=f"{what} (default: all cores; 1: this process only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lhtstream",
        description=(
            "Real-time monitor for laser surface heat treatment: replay 1000 fps thermal "
            "difference videos over ZeroMQ, extract spot features with Numba, score them "
            "against a model of normal operation and publish alarms."
        ),
        epilog="Run `lhtstream demo` to see the whole system work on a small synthetic set.",
    )
    parser.add_argument("--version", action="version", version=f"lhtstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="synthesise, train, replay and monitor: the whole system in one run",
        epilog="Exit status: 0 after a full run; 130 after Ctrl-C, which stops the replay and the "
        "monitor, removes their sockets and prints a partial summary.",
    )
    p.add_argument(
        "--cache", default=None, help="folder for the demo data set and model (default: user cache)"
    )
    p.add_argument(
        "--seconds",
        type=_SECONDS,
        default=None,
        help="seconds of footage to stream (default: the demo set)",
    )
    p.add_argument(
        "--view-port",
        type=_number(int, 0, 65535),
        default=8050,
        help="port of the live view the demo serves on 127.0.0.1 (default: %(default)s; "
        "another free one when taken; 0: any free one)",
    )
    p.set_defaults(command="demo")

    p = sub.add_parser("synth", help="write a synthetic data set in the published format")
    p.add_argument("out", help="output folder (created); TypeN/ folders and labels.csv go inside")
    p.add_argument(
        "--types", type=_types, default=None,
        help="types to generate, e.g. 1,5,20-36 (default: all 36)",
    )
    p.add_argument(
        "--videos-per-type", type=_number(int, 1, 10_000), default=None,
        help="videos per type, 1..10000 (default: small set)",
    )
    p.add_argument("--frames", type=_number(int, 1, 1_000_000), default=None,
                   help="frames per video, 1..1000000 (1 frame = 1 ms)")
    p.add_argument(
        "--anomaly-rate", type=_number(float, 0.0, 1.0), default=0.0,
        help="fraction of videos with an injected fault, 0..1",
    )
    p.add_argument(
        "--anomalies", default=None, help="fault kinds to draw from, comma-separated (default: all)"
    )
    p.add_argument(
        "--seed",
        type=_number(int, 0, 2**32 - 1),
        default=0,
        help="random seed; same arguments and seed give identical files",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the real data set's size: 4223 videos, ~63 M frames, tens of GB",
    )
    p.add_argument(
        "--ramp-frames",
        type=_number(int, 0, 1_000_000),
        default=0,
        metavar="N",
        help="faults with a magnitude (all but obstacle_pattern_misplaced, camera_dropout, "
        "frame_freeze) grow linearly from the onset, complete after N frames "
        "(default 0: full magnitude at once)",
    )
    p.set_defaults(command="synth")

    p = sub.add_parser(
        "perturb",
        help="copy a data set with unseen faults painted on its normal videos",
        description="Copy SRC's normal videos to OUT and add, for each of them and each "
        "perturbation, a copy with that frame-level fault (optics, stray light, sensor, "
        "alignment, frame timing) from an onset drawn in 20-55%% of the video to its end. "
        "OUT gets labels.csv (kind, onset) for `lhtstream evaluate` and perturbations.csv "
        "(which source each copy came from).",
    )
    p.add_argument("src", nargs="?", help="data-set root or TypeN folder with normal videos")
    p.add_argument("out", nargs="?", help="output folder (must be new or empty)")
    p.add_argument("--kinds", default=None, help="perturbations, comma-separated (default: all)")
    p.add_argument("--types", type=_types, default=None,
                   help="types to use, e.g. 1,5,20-36 (default: all)")
    p.add_argument("--videos", default=None, help="source video names, e.g. 0001,0002")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0,
                   help="random seed (onsets, placements)")
    p.add_argument(
        "--scale", type=_number(float, 0.01, 10.0), default=1.0,
        help="multiply every default magnitude by this, 0.01..10 (e.g. 0.5: how small a fault "
        "is still caught)",
    )
    p.add_argument("--list", action="store_true", help="list the perturbations and exit")
    p.set_defaults(command="perturb")

    p = sub.add_parser(
        "validate", help="check a data set (root or TypeN folder) against the format"
    )
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.set_defaults(command="validate")

    p = sub.add_parser("replay", help="publish videos as a live 1000 fps stream")
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.add_argument(
        "--endpoint",
        type=_endpoint,
        default=DEFAULT_FRAME_ENDPOINT,
        help="PUB endpoint to bind (default: %(default)s)",
    )
    p.add_argument(
        "--rate", type=_rate, default="1000",
        help="frames/s per stream, or 'max' (default: %(default)s)",
    )
    p.add_argument(
        "--loop", action="store_true", help="start again from the first video after the last"
    )
    p.add_argument("--types", type=_types, default=None, help="types to replay, e.g. 1,5,20-36")
    p.add_argument("--videos", default=None, help="video names to replay, e.g. 0001,0002")
    p.add_argument(
        "--streams",
        type=_number(int, 1, 1024),
        default=1,
        help="independent streams (workstations), each at the full rate, 1..1024",
    )
    p.add_argument(
        "--stream-prefix",
        default="ws",
        help="streams are named PREFIX1..PREFIXK (default: %(default)s)",
    )
    p.add_argument(
        "--wait-subscribers",
        type=_number(int, 0, 1000),
        default=1,
        help="hold the first frame until every stream has N frame subscribers (0: start at "
        "once; default %(default)s)",
    )
    p.add_argument(
        "--summary-json",
        default=None,
        metavar="FILE",
        help="at exit (also when stopped by a signal), write the run's summary to FILE as one "
        "JSON object: frames_sent, frames_skipped, videos_started, ticks, seconds, streams, "
        "stopped, jitter_us {n, p50, p99, p999, max} (null at --rate max); the same as the "
        "two summary lines on stderr, for programs",
    )
    _curve_options(p, binds=True, connects=False)
    p.set_defaults(command="replay")

    p = sub.add_parser(
        "monitor", help="score frame streams live and publish status, alarms and verdicts"
    )
    p.add_argument(
        "--frames",
        action="append",
        type=_endpoint,
        default=None,
        help=f"frame endpoint to connect (repeatable; default {DEFAULT_FRAME_ENDPOINT})",
    )
    p.add_argument(
        "--publish",
        type=_endpoint,
        default=DEFAULT_PUBLISH_ENDPOINT,
        help="PUB endpoint to bind (default: %(default)s)",
    )
    p.add_argument(
        "--streams",
        type=_streams,
        default=None,
        help="serve only these streams: comma-separated names or shell-style patterns "
        "(ws1,ws2,line2-*); ZeroMQ filters the others out by topic prefix (default: all)",
    )
    p.add_argument(
        "--max-streams",
        type=_number(int, 1, 4096),
        default=64,
        help="streams served at once; messages of further streams are refused and counted "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--idle-seconds",
        type=_number(float, 1.0, 7 * 24 * 3600.0),
        default=300.0,
        help="evict a stream after this long without a message (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model file from `lhtstream train` (default: self-calibrate per stream)",
    )
    p.add_argument(
        "--journal",
        default=None,
        help="SQLite alarm journal (default: lhtstream-journal.sqlite in the current folder)",
    )
    p.add_argument(
        "--status-interval",
        type=_number(float, 0.05, 3600.0),
        default=1.0,
        help="seconds between status messages, 0.05..3600 (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-seconds",
        type=_number(float, 0.2, 120.0),
        default=None,
        help="seconds of footage to self-calibrate on when there is no model, 0.2..120 "
        "(default: 10)",
    )
    p.add_argument(
        "--latency-log",
        default=None,
        metavar="FILE",
        help="at exit, write every frame's handling latency (µs, done minus the frame's t_ns; "
        "the first 4 000 000 frames, up to 32 MB) to FILE as a float64 .npy, for exact "
        "run-wide percentiles beside the per-interval ones of status (lhtstream bench uses it)",
    )
    _curve_options(p, binds=True, connects=True)
    p.set_defaults(command="monitor")

    p = sub.add_parser("tap", help="print messages from a PUB endpoint")
    p.add_argument(
        "--endpoint",
        type=_endpoint,
        default=DEFAULT_PUBLISH_ENDPOINT,
        help="endpoint to connect (default: %(default)s)",
    )
    p.add_argument(
        "--topic",
        action="append",
        default=None,
        help="topic prefix to subscribe to (repeatable; default: all)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=_COUNT, default=None, help="exit after N messages")
    p.add_argument("--timeout", type=_SECONDS, default=None, help="exit after S seconds")
    _curve_options(p, binds=False, connects=True)
    p.set_defaults(command="tap")

    p = sub.add_parser(
        "view",
        help="serve a live web page of the monitors' streams, and /metrics for Prometheus",
        epilog="Open the printed address in a browser. Every asset comes from the installed "
        "packages (no internet needed). Stops on Ctrl-C or SIGTERM (exit 0). "
        "What it trusts: it shows what the peers on --monitor and --frames send (checked "
        "and bounded, never run); anyone who can connect to its port can read the page, "
        "/api/* and /metrics (there is no login, and nothing can be changed through it), "
        "so serve it on a plant network only behind that network's own access control. "
        "What it refuses: a request whose Host header is not one of its names (localhost, "
        "127.0.0.1, [::1], the --host address, --allow-host names) gets 421, so a web "
        "page cannot reach it through DNS rebinding; a WebSocket from a page of another "
        "origin gets 403; more than 64 connections get 503; a connection with no request "
        "in progress for 5 s (slow or idle) is closed. Pages may load nothing from "
        "elsewhere nor be framed (Content-Security-Policy).",
    )
    p.add_argument(
        "--monitor",
        action="append",
        default=None,
        type=_endpoint,
        metavar="EP",
        help=f"monitor endpoint to subscribe to (repeatable; default {DEFAULT_PUBLISH_ENDPOINT})",
    )
    p.add_argument(
        "--frames",
        action="append",
        default=None,
        type=_endpoint,
        metavar="EP",
        help="frame endpoint (the replay's) for the heat map and the spot path (repeatable; "
        "default: none, no pictures)",
    )
    p.add_argument(
        "--model", default=None, help="model file from `lhtstream train`: draws its normal path"
    )
    p.add_argument("--journal", default=None, help="alarm journal (SQLite) for the history view")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default: %(default)s, this machine only; 0.0.0.0: every "
        "interface, then name the addresses browsers use with --allow-host)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a host name or address by which browsers reach the view, e.g. its plant-"
        "network name (repeatable); requests for other names are refused",
    )
    p.add_argument(
        "--port",
        type=_number(int, 0, 65535),
        default=8050,
        help="TCP port (default: %(default)s; 0: a free one)",
    )
    p.set_defaults(command="view")

    p = sub.add_parser("train", help="learn a model of normal operation from normal videos")
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    p.add_argument("--types", type=_types, default=None,
                   help="types to train on, e.g. 1,5,20-36")
    _add_workers(p, "processes computing the videos' features")
    p.set_defaults(command="train")

    p = sub.add_parser(
        "alarms", help="show alarms live from monitors, or from their journals with --history"
    )
    p.add_argument(
        "--endpoint",
        action="append",
        type=_endpoint,
        default=None,
        help="monitor endpoint; repeat to fan in several monitors "
        f"(default {DEFAULT_PUBLISH_ENDPOINT})",
    )
    p.add_argument("--history", action="store_true", help="read journals instead of subscribing")
    p.add_argument(
        "--journal", action="append", default=None,
        help="journal file; repeat to merge several by time (default lhtstream-journal.sqlite)",
    )
    p.add_argument("--since", default=None,
                   help="only alarms after this alarm seq (of each journal), or ISO time")
    p.add_argument("--streams", "--stream", dest="streams", type=_streams, default=None,
                   help="only these streams: names or shell-style patterns, comma-separated")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=_COUNT, default=None, help="exit after N alarms (live)")
    p.add_argument("--timeout", type=_SECONDS, default=None,
                   help="exit after S seconds (live)")
    _curve_options(p, binds=False, connects=True)
    p.set_defaults(command="alarms")

    p = sub.add_parser(
        "keys", help="make a CURVE key pair (for --curve-secret / --curve-server-key)",
        description="Write FOLDER/NAME.key (public: give it to peers) and "
        "FOLDER/NAME.key_secret (this process's --curve-secret). Never overwrites.",
    )
    p.add_argument("folder", help="folder to write the key files in (created)")
    p.add_argument("--name", default="lhtstream",
                   help="file name stem, e.g. the host or role (default: %(default)s)")
    p.set_defaults(command="keys")

    p = sub.add_parser("evaluate", help="score a labelled data set through the monitor's code path")
    p.add_argument("data", help="data-set root with labels.csv")
    p.add_argument("--model", required=True, help="model file from `lhtstream train`")
    p.add_argument("--types", type=_types, default=None, help="types to evaluate")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument(
        "--plots",
        default=None,
        help="write ROC and timeline PNGs to this folder (needs the plots extra)",
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the KDE-AMD baselines (they are slow)"
    )
    p.add_argument(
        "--protocol-noise",
        default=None,
        metavar="VARIANCES",
        help="position-noise variances (px^2) of the KDE-AMD protocol, comma-separated, e.g. "
        "0.02,0.01,0.005,0.0025 (default: the published 0.02)",
    )
    _add_workers(p, "processes scoring the videos on the monitor path")
    p.set_defaults(command="evaluate")

    p = sub.add_parser(
        "bench",
        help="measure end-to-end latency, the view's cost and throughput; print a summary",
        epilog="Needs only the installed package. The per-frame micro-benchmarks "
        "(pytest-benchmark) are for developers: `pytest bench` in a source checkout.",
    )
    p.add_argument("--quick", action="store_true", help="short runs (what CI runs)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument(
        "--seconds",
        type=_SECONDS,
        default=None,
        help="seconds per end-to-end run (default: 60, or 5 with --quick)",
    )
    p.set_defaults(command="bench")
    return parser


SERVICES = frozenset({"monitor", "view", "replay"})
"""Commands that install their own SIGINT/SIGTERM handlers once they run."""


def main(argv: Sequence[str] | None = None) -> int:
    """The `lhtstream` command; ``argv`` None: this process's own arguments."""
    if argv is None:  # this process's command, not a call from Python (tests)
        # SIGINT/SIGTERM during the imports below exit 0 with a line, not silently
        exit_on_stop_signals()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from lhtstream.cli import commands  # local import: start-up time (numba, ~0.5 s)

    if argv is None and args.command not in SERVICES:
        # the rest stop as before: Ctrl-C is KeyboardInterrupt (130), SIGTERM the default
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        return int(handler(args) or 0)
    except (
        LhtstreamError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        print(f"lhtstream: error: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:  # a bad endpoint, an address in use, ...
        print(f"lhtstream: error: ZeroMQ: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lhtstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
