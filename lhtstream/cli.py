"""The `lhtstream` command: a thin argparse layer over the library.

Each subcommand parses its options and calls one library function; all the
work lives in the module named after the concept. Errors the user can fix are
printed as one line (`lhtstream: error: ...`) with exit code 2, never as a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lhtstream import __version__

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"


class UsageError(Exception):
    """A problem with the user's input that deserves a one-line message."""


def parse_types(text: str | None) -> list[int] | None:
    """Parse a type selection like ``1,5,20-36`` into sorted unique ints (1..36)."""
    if text is None:
        return None
    types: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                types.update(range(lo, hi + 1))
            else:
                types.add(int(part))
        except ValueError:
            raise UsageError(f"bad type selection {text!r}: use e.g. 1,5,20-36") from None
    if not types or min(types) < 1 or max(types) > 36:
        raise UsageError(f"bad type selection {text!r}: types are 1..36")
    return sorted(types)


def parse_names(text: str | None) -> list[str] | None:
    """Parse a comma-separated list of video names (``0001,0002``)."""
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


# ---------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from lhtstream.simulate import synthesize

    summary = synthesize(
        args.out,
        types=parse_types(args.types),
        videos_per_type=args.videos_per_type,
        frames=args.frames,
        anomaly_rate=args.anomaly_rate,
        anomalies=parse_names(args.anomalies),
        seed=args.seed,
        full=args.full,
        progress=sys.stderr.isatty(),
    )
    print(summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lhtstream.dataset import validate

    problems = validate(args.data)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.data}", file=sys.stderr)
        return 1
    print(f"{args.data}: OK")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from lhtstream.replay import run_replay

    return run_replay(args)


def cmd_monitor(args: argparse.Namespace) -> int:
    from lhtstream.monitor import run_monitor

    return run_monitor(args)


def cmd_tap(args: argparse.Namespace) -> int:
    from lhtstream.protocol import run_tap

    return run_tap(args)


def cmd_train(args: argparse.Namespace) -> int:
    from lhtstream.model import run_train

    return run_train(args)


def cmd_alarms(args: argparse.Namespace) -> int:
    from lhtstream.journal import run_alarms

    return run_alarms(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lhtstream.evaluate import run_evaluate

    return run_evaluate(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from lhtstream.benchmark import run_bench

    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from lhtstream.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        type=float,
        default=None,
        help="seconds of footage to stream (default: the demo set)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic data set in the published format")
    p.add_argument("out", help="output folder (created); TypeN/ folders and labels.csv go inside")
    p.add_argument(
        "--types", default=None, help="types to generate, e.g. 1,5,20-36 (default: all 36)"
    )
    p.add_argument(
        "--videos-per-type", type=int, default=None, help="videos per type (default: small set)"
    )
    p.add_argument("--frames", type=int, default=None, help="frames per video (1 frame = 1 ms)")
    p.add_argument(
        "--anomaly-rate", type=float, default=0.0, help="fraction of videos with an injected fault"
    )
    p.add_argument(
        "--anomalies", default=None, help="fault kinds to draw from, comma-separated (default: all)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed; same arguments and seed give identical files",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the real data set's size: 4223 videos, ~63 M frames, tens of GB",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "validate", help="check a data set (root or TypeN folder) against the format"
    )
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("replay", help="publish videos as a live 1000 fps stream")
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.add_argument(
        "--endpoint",
        default=DEFAULT_FRAME_ENDPOINT,
        help="PUB endpoint to bind (default: %(default)s)",
    )
    p.add_argument(
        "--rate", default="1000", help="frames/s per stream, or 'max' (default: %(default)s)"
    )
    p.add_argument(
        "--loop", action="store_true", help="start again from the first video after the last"
    )
    p.add_argument("--types", default=None, help="types to replay, e.g. 1,5,20-36")
    p.add_argument("--videos", default=None, help="video names to replay, e.g. 0001,0002")
    p.add_argument(
        "--streams",
        type=int,
        default=1,
        help="independent streams (workstations), each at the full rate",
    )
    p.add_argument(
        "--wait-subscribers",
        type=int,
        default=1,
        help="hold the first frame until N subscribers joined (0: start at once)",
    )
    p.add_argument(
        "--skip", default=None, help=argparse.SUPPRESS
    )  # test hook: seq numbers not to send
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "monitor", help="score frame streams live and publish status, alarms and verdicts"
    )
    p.add_argument(
        "--frames",
        action="append",
        default=None,
        help=f"frame endpoint to connect (repeatable; default {DEFAULT_FRAME_ENDPOINT})",
    )
    p.add_argument(
        "--publish",
        default=DEFAULT_PUBLISH_ENDPOINT,
        help="PUB endpoint to bind (default: %(default)s)",
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
        type=float,
        default=1.0,
        help="seconds between status messages (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-seconds",
        type=float,
        default=None,
        help="seconds of footage to self-calibrate on when there is no model",
    )
    p.add_argument(
        "--dump-features", default=None, help=argparse.SUPPRESS
    )  # test hook: DIR/<stream>.npy of streamed feature rows at exit
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("tap", help="print messages from a PUB endpoint")
    p.add_argument(
        "--endpoint",
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
    p.add_argument("--count", type=int, default=None, help="exit after N messages")
    p.add_argument("--timeout", type=float, default=None, help="exit after S seconds")
    p.set_defaults(func=cmd_tap)

    p = sub.add_parser("train", help="learn a model of normal operation from normal videos")
    p.add_argument("data", help="data-set root or one TypeN folder")
    p.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    p.add_argument("--types", default=None, help="types to train on, e.g. 1,5,20-36")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("alarms", help="show alarms live, or from the journal with --history")
    p.add_argument(
        "--endpoint",
        default=DEFAULT_PUBLISH_ENDPOINT,
        help="monitor endpoint (default: %(default)s)",
    )
    p.add_argument("--history", action="store_true", help="read the journal instead of subscribing")
    p.add_argument(
        "--journal", default=None, help="journal file (default: lhtstream-journal.sqlite)"
    )
    p.add_argument("--since", default=None, help="only alarms after this alarm seq, or ISO time")
    p.add_argument("--stream", default=None, help="only this stream")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=None, help="exit after N alarms (live)")
    p.add_argument("--timeout", type=float, default=None, help="exit after S seconds (live)")
    p.set_defaults(func=cmd_alarms)

    p = sub.add_parser("evaluate", help="score a labelled data set through the monitor's code path")
    p.add_argument("data", help="data-set root with labels.csv")
    p.add_argument("--model", required=True, help="model file from `lhtstream train`")
    p.add_argument("--types", default=None, help="types to evaluate")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument(
        "--plots",
        default=None,
        help="write ROC and timeline PNGs to this folder (needs the plots extra)",
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the KDE-AMD baseline (it is slow)"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="run the benchmark suites and print a summary")
    p.add_argument("--quick", action="store_true", help="short runs (what CI runs)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per end-to-end run (default: 60, or 5 with --quick)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import zmq

    from lhtstream.errors import LhtstreamError

    try:
        return int(args.func(args) or 0)
    except (
        UsageError,
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
