"""`lhtstream tap` and `lhtstream alarms`: subscribers that print the monitor's messages.

They are clients like any other (docs/protocol.md): they decode with the wire
module, never raise on a malformed message, and stop on --count, --timeout,
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from lhtstream.io.curve import Curve
from lhtstream.io.curve import client as curve_client
from lhtstream.io.events import Alarm
from lhtstream.io.journal import DEFAULT_JOURNAL, Journal, json_number
from lhtstream.io.protocol import (
    DEFAULT_PUBLISH_ENDPOINT,
    Message,
    ProtocolError,
    StreamSelection,
    configure_subscriber,
    decode,
    frame_array,
    from_wire,
)


def to_json(message: Message) -> dict[str, Any]:
    """Header fields plus ``topic`` (frames: no pixels), JSON-safe."""
    out: dict[str, Any] = {"topic": message.topic}
    out.update(message.header)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _num(value: Any, fmt: str = ".0f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, fmt)
    return str(value)


def format_message(message: Message) -> str:
    """One readable line with the topic's key fields."""
    h = message.header
    topic = message.topic
    where = f"{h.get('stream')} T{h.get('type')}/{h.get('video')}"
    if topic == "frame":
        pixels = frame_array(message)
        return (
            f"frame   {where} #{h['frame']} seq={h['seq']} obstacle={h['obstacle']} "
            f"{h['shape'][0]}x{h['shape'][1]} min={int(pixels.min())} max={int(pixels.max())}"
        )
    if topic == "video":
        frames = h["metadata"].get("SizeInFrames", "?")
        return f"video   {where} {h['event']} frames={frames}"
    if topic == "status":
        lat = h["latency_us"]
        return (
            f"status  {h['stream']} frames={h['frames']} dropped={h['dropped']} "
            f"malformed={h['malformed']} latency_us p50={_num(lat['p50'])} "
            f"p99={_num(lat['p99'])} p999={_num(lat['p999'])} max={_num(lat['max'])} "
            f"uptime={_num(h['uptime_s'], '.1f')}s"
        )
    if topic == "alarm":
        return (
            f"alarm   {where} #{h['frame']} {h['state'].upper()} {h['kind']} "
            f"score={_num(h['score'], '.3g')} threshold={_num(h['threshold'], '.3g')} "
            f"alarm_seq={h['seq']}"
        )
    return (
        f"verdict {where} frames={h['frames']} score={_num(h['score'], '.3g')} "
        f"{'ANOMALOUS' if h['anomalous'] else 'normal'} alarms={h['alarms']}"
    )


def tap(
    endpoint: str,
    topics: Sequence[str] | None = None,
    *,
    as_json: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: Any = None,
    err: Any = None,
    curve: Curve | None = None,
) -> int:
    """Print messages from ``endpoint`` until ``count`` messages or ``timeout`` seconds.

    Returns the number of valid messages printed. Malformed messages give a
    warning line on ``err`` (never an exception).
    """

    out = out or sys.stdout
    err = err or sys.stderr
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    curve_client(curve, socket)
    configure_subscriber(socket, topics)
    printed = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        socket.connect(endpoint)
        topic_list = ",".join(topics) if topics else "all topics"
        print(f"tap: listening on {endpoint} ({topic_list})", file=err, flush=True)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while count is None or printed < count:
            wait_ms = 200
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_ms = min(wait_ms, max(1, int(left * 1000)))
            if not poller.poll(wait_ms):
                continue
            parts = socket.recv_multipart()
            try:
                message = decode(parts)
            except ProtocolError as exc:
                print(f"tap: malformed message ignored: {exc}", file=err, flush=True)
                continue
            if as_json:
                line = json.dumps(to_json(message), default=_json_default, allow_nan=True)
            else:
                line = format_message(message)
            print(line, file=out, flush=True)
            printed += 1
    finally:
        socket.close(linger=0)
    return printed


def run_tap(args: Any) -> int:
    """CLI handler for ``lhtstream tap``; exits 0 on --count, --timeout, SIGINT or SIGTERM."""
    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        tap(args.endpoint, args.topic, as_json=args.json, count=args.count, timeout=args.timeout,
            curve=Curve.from_files(args.curve_secret, args.curve_server_key))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `lhtstream tap | head`: the reader left, a normal way to stop; point
        # stdout at /dev/null so the interpreter's final flush does not fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def format_alarm(a: Mapping[str, Any]) -> str:
    """One readable line for an alarm."""
    score, thr = a.get("score"), a.get("threshold")
    score_s = "-" if score is None else f"{score:.3g}"
    thr_s = "-" if thr is None else f"{thr:.3g}"
    stamp = a.get("time", "")
    return (
        f"{stamp + ' ' if stamp else ''}#{a.get('seq')} {str(a.get('state', '')).upper():5} "
        f"{a.get('kind')} stream={a.get('stream')} type={a.get('type')} video={a.get('video')} "
        f"frame={a.get('frame')} score={score_s} threshold={thr_s}"
    )


def format_verdict(v: Mapping[str, Any]) -> str:
    """One readable line for a verdict."""
    score = v.get("score")
    return (
        f"VERDICT {'ANOMALOUS' if v.get('anomalous') else 'normal'} stream={v.get('stream')} "
        f"type={v.get('type')} video={v.get('video')} frames={v.get('frames')} "
        f"score={'-' if score is None else f'{score:.3g}'} alarms={v.get('alarms')}"
    )


def _json_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(json_number(obj), separators=(",", ":"), allow_nan=False)


def _print(line: str) -> None:
    print(line, flush=True)


def history(paths: Sequence[str], since: str | None = None,
            streams: StreamSelection | None = None) -> list[dict[str, Any]]:
    """Alarms of several journals merged by the time they were journaled (then journal
    order, then seq). With more than one journal each row also names its ``journal``
    (seqs are per journal: an integer ``since`` applies to each one's own seq)."""
    rows: list[tuple[str, int, int, dict[str, Any]]] = []
    for order, path in enumerate(paths):
        with Journal(path, writer=False) as journal:
            for alarm in journal.alarms(since=since):
                if streams is not None and not streams.matches(alarm["stream"]):
                    continue
                if len(paths) > 1:
                    alarm["journal"] = str(path)
                rows.append((alarm["time"], order, alarm["seq"], alarm))
    rows.sort(key=lambda r: r[:3])  # ISO UTC times of one format sort as strings
    return [r[3] for r in rows]


def run_alarms(args: argparse.Namespace) -> int:
    """``lhtstream alarms``: live alarms (and verdicts) from one or more monitors, or
    ``--history`` from one or more journals."""
    streams = StreamSelection(args.streams) if args.streams else None
    if args.history:
        for alarm in history(args.journal or [DEFAULT_JOURNAL], args.since, streams):
            _print(_json_line(alarm) if args.json else format_alarm(alarm))
        return 0
    return _run_live(args, streams)


def _run_live(args: argparse.Namespace, streams: StreamSelection | None) -> int:
    """Subscribe to every ``--endpoint`` (one SUB connected to all: ZeroMQ fans them in)."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    curve_client(Curve.from_files(args.curve_secret, args.curve_server_key), sub)
    configure_subscriber(sub, ["alarm", "verdict"], streams)
    endpoints = args.endpoint or [DEFAULT_PUBLISH_ENDPOINT]
    for endpoint in endpoints:
        sub.connect(endpoint)
    print(f"alarms: listening on {', '.join(endpoints)}", file=sys.stderr, flush=True)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    last_warning = -math.inf
    try:
        while args.count is None or seen < args.count:
            wait_ms = 200
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            if not sub.poll(wait_ms):
                continue
            try:
                message = decode(sub.recv_multipart())
            except ProtocolError as exc:  # a garbled message must not stop an operator's console
                if time.monotonic() - last_warning > 1.0:
                    last_warning = time.monotonic()
                    print(f"lhtstream alarms: malformed message skipped: {exc}",
                          file=sys.stderr, flush=True)
                continue
            try:
                event = from_wire(message)
            except ProtocolError:  # a raw prefix let another topic through: not ours
                continue
            if streams is not None and not streams.matches(event.stream):
                continue
            is_alarm = isinstance(event, Alarm)
            if args.json:  # every header field, also those this version does not know
                _print(_json_line({"topic": message.topic, **message.header}))
            else:  # the journal's rows and the wire's events print alike, by field
                _print(format_alarm(vars(event)) if is_alarm else format_verdict(vars(event)))
            if is_alarm:
                seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
    return 0
