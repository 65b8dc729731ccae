"""The wire protocol's schema: endpoints, bounds, names and routes (topics), the
required fields per topic and their checks, and the mapping of events (`Alarm`,
`Verdict`, from ``lhtstream.io.events``) to the wire and back.
``lhtstream.io.protocol`` re-exports all of it."""

from __future__ import annotations

import math
import re
import struct
import time
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack
import zmq

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.selection import N_TYPES
from lhtstream.io.events import Alarm, Event, Verdict

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"  #: replay binds, monitors connect
DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"  #: the monitor binds, subscribers connect
SCHEMA_VERSION = 2
"""Header field ``v``; bumped on any incompatible change (2: stream in the topic, bounds)."""

TOPICS: tuple[str, ...] = ("frame", "video", "status", "alarm", "verdict")

FRAME_DTYPE = "<u2"
"""The only pixel type of frames: uint16, little-endian."""

MAX_FRAME_SIDE = 32
"""The camera is 32x32 pixels; ROI rows and cols must lie in 1..32."""

MAX_NAME = 64
"""Longest ``stream``, ``video`` or ``kind`` name, in characters."""

NAME_CHARS = "A-Z a-z 0-9 _ . -"
"""What a name may be made of (documented form of ``_NAME``)."""

_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NAME}}}")

ALL_STREAMS = "*"
"""The ``stream`` of a status about the whole monitor (never a stream's own name)."""

INT64_MAX = (1 << 63) - 1
"""Every integer on the wire fits a signed 64-bit integer (what SQLite and C clients store)."""

MAX_METADATA_ENTRIES = 64
"""A ``video`` message's ``metadata`` map: at most this many entries (the data set has 10)."""

MAX_HEADER_BYTES = 32 * 1024
"""Upper bound on a packed header; every header the monitor makes is far below it."""

MAX_MESSAGE_BYTES = 64 * 1024
"""Bound for ZMQ_MAXMSGSIZE on subscribers (per part): a peer sending more is cut off."""

# msgpack.unpackb bounds every string, list and map by the input's own length, and the
# input is checked against MAX_HEADER_BYTES first, so a hostile header cannot make the
# decoder allocate much; passing limits as keywords would only cost ~0.4 µs per frame.
_unpack = msgpack.unpackb

_ZMQ_FRAME = zmq.Frame  # a received part (copy=False): len() is its size in bytes
_MISSING = object()
_NUMBER = (int, float)
_OPT_NUMBER = (int, float, type(None))
_SCALAR = (int, float, bool, type(None), str)


class ProtocolError(LhtstreamError):
    """A message that does not follow the protocol; ``reason`` names the part or field."""

    def __init__(self, reason: str, topic: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        super().__init__(f"{topic} message: {reason}" if topic else reason)


class Message(NamedTuple):
    """A decoded message. ``payload`` is None for every topic but ``frame``."""

    topic: str
    header: dict[str, Any]
    payload: bytes | None = None


# NamedTuple's __new__ is a Python function; the frame fast path builds the tuple directly
_new_message = tuple.__new__


# Required fields per topic: name -> exact Python types accepted after unpacking.
# Exact types (not isinstance) so that True is not accepted as an int.
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "frame": {
        "v": (int,), "stream": (str,), "video": (str,), "type": (int,), "seq": (int,),
        "frame": (int,), "t_ns": (int,), "shape": (list,), "dtype": (str,),
        "obstacle": (int,),
    },
    "video": {
        "v": (int,), "stream": (str,), "video": (str,), "type": (int,), "event": (str,),
        "metadata": (dict,),
    },
    "status": {
        "v": (int,), "stream": (str,), "t_ns": (int,), "frames": (int,), "dropped": (int,),
        "malformed": (int,), "latency_us": (dict,), "uptime_s": _NUMBER,
    },
    "alarm": {
        "v": (int,), "stream": (str,), "video": (str,), "type": (int,), "frame": (int,),
        "seq": (int,), "t_frame_ns": (int,), "t_alarm_ns": (int,), "kind": (str,),
        "state": (str,), "score": _NUMBER, "threshold": _NUMBER, "features": (dict,),
    },
    "verdict": {
        "v": (int,), "stream": (str,), "video": (str,), "type": (int,), "frames": (int,),
        "score": _NUMBER, "anomalous": (bool,), "alarms": (int,),
    },
}
# Integer fields and their ranges (inclusive); every other integer field is 0..INT64_MAX.
_INT_RANGE: dict[str, tuple[int, int]] = {"type": (1, N_TYPES), "v": (0, INT64_MAX)}
_NAME_FIELDS = ("stream", "video", "kind")
_TOPIC_BYTES = {t: t.encode("ascii") for t in TOPICS}
_LATENCY_KEYS = ("p50", "p99", "p999", "max")
_VIDEO_EVENTS = ("start", "end")
_ALARM_STATES = ("raise", "clear")
_OBSTACLE_STATES = (0, 1, 2)
# Fast path for valid frames: all required fields fetched in one C call and their exact
# types compared as one tuple; anything else goes through the field-by-field checks, which
# name the fault.
_FRAME_FIELD_NAMES = tuple(_FIELDS["frame"])
_frame_values = itemgetter(*_FRAME_FIELD_NAMES)
_FRAME_TYPES = tuple(types[0] for types in _FIELDS["frame"].values())
assert all(len(types) == 1 for types in _FIELDS["frame"].values())

_KNOWN_CAP = 4096
# Names and topics seen valid, so a repeated one costs a set/dict lookup, not a regex.
# Cleared when full: a flood of distinct names costs a regex each, never memory.
_valid_names: set[str] = set()
_routes: dict[bytes, tuple[str, str]] = {}


def valid_name(name: Any) -> bool:
    """True for a str of 1..64 characters from ``A-Z a-z 0-9 _ . -``."""
    if name in _valid_names:
        return True
    if type(name) is not str or _NAME.fullmatch(name) is None:
        return False
    if len(_valid_names) >= _KNOWN_CAP:
        _valid_names.clear()
    _valid_names.add(name)
    return True


def check_name(name: Any, what: str = "stream") -> str:
    """``name`` if ``valid_name``; else ProtocolError naming ``what`` and the rule."""
    if not valid_name(name):
        shown = repr(name[:40]) + ("..." if len(name) > 40 else "") if isinstance(name, str) \
            else type(name).__name__
        raise ProtocolError(
            f"{what} name {shown}: need 1..{MAX_NAME} characters from {NAME_CHARS}"
        )
    return name


def topic_bytes(topic: str, stream: str) -> bytes:
    """The topic part ``<topic>/<stream>/`` (``stream`` is a valid name or ``*``)."""
    return b"%s/%s/" % (_TOPIC_BYTES[topic], stream.encode("ascii"))


def _route(raw_topic: bytes) -> tuple[str, str]:
    """(topic, stream) of a topic part; ProtocolError when it is not ``<topic>/<name>/``."""
    route = _routes.get(raw_topic)
    if route is not None:
        return route
    kind, sep, rest = raw_topic.partition(b"/")
    topic = kind.decode("ascii", "replace")
    if topic not in _TOPIC_BYTES:
        raise ProtocolError(f"part 0: unknown topic {raw_topic[:40]!r}")
    if not sep or not rest.endswith(b"/"):
        raise ProtocolError(
            f"part 0: topic {raw_topic[:40]!r} is not '{topic}/<stream>/' "
            f"(a schema 1 publisher? this is schema {SCHEMA_VERSION})", topic
        )
    stream = rest[:-1].decode("ascii", "replace")
    if not (valid_name(stream) or (stream == ALL_STREAMS and topic == "status")):
        raise ProtocolError(
            f"part 0: stream {rest[:40]!r} in the topic: need 1..{MAX_NAME} characters "
            f"from {NAME_CHARS}", topic
        )
    if len(_routes) >= _KNOWN_CAP:
        _routes.clear()
    route = (topic, stream)
    _routes[bytes(raw_topic)] = route
    return route


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _check_fields(topic: str, header: dict, stream: str) -> None:
    for name, types in _FIELDS[topic].items():
        value = header.get(name, _MISSING)
        if value is _MISSING:
            raise ProtocolError(f"header field {name!r} missing", topic)
        if type(value) not in types:
            expected = "/".join(t.__name__ for t in types)
            raise ProtocolError(
                f"header field {name!r}: expected {expected}, got {_type_name(value)}", topic
            )
        if type(value) is int:
            lo, hi = _INT_RANGE.get(name, (0, INT64_MAX))
            if not lo <= value <= hi:
                raise ProtocolError(f"header field {name!r}: {value} outside {lo}..{hi}", topic)
    if header["v"] != SCHEMA_VERSION:
        raise ProtocolError(
            f"header field 'v': schema version {header['v']}, this is {SCHEMA_VERSION}", topic
        )
    for name in _NAME_FIELDS:
        if name in _FIELDS[topic] and not (name == "stream" and header[name] == stream):
            try:
                check_name(header[name], name)
            except ProtocolError as exc:
                raise ProtocolError(f"header field {name!r}: {exc.reason}", topic) from None
    if header["stream"] != stream:
        raise ProtocolError(
            f"header field 'stream': {header['stream']!r} but the topic says {stream!r}", topic
        )


def _check_frame(header: dict, payload: Any) -> None:
    shape = header["shape"]
    if len(shape) != 2 or type(shape[0]) is not int or type(shape[1]) is not int:
        raise ProtocolError("header field 'shape': expected [rows, cols] of ints", "frame")
    rows, cols = shape
    if not (1 <= rows <= MAX_FRAME_SIDE and 1 <= cols <= MAX_FRAME_SIDE):
        raise ProtocolError(
            f"header field 'shape': {rows}x{cols} outside 1..{MAX_FRAME_SIDE}", "frame"
        )
    if header["dtype"] != FRAME_DTYPE:
        raise ProtocolError(
            f"header field 'dtype': {header['dtype']!r}, frames are {FRAME_DTYPE!r}", "frame"
        )
    if header["obstacle"] not in _OBSTACLE_STATES:
        raise ProtocolError(f"header field 'obstacle': {header['obstacle']} not 0/1/2", "frame")
    size = len(payload)
    if size != rows * cols * 2:
        raise ProtocolError(
            f"payload: {size} bytes, shape {rows}x{cols} x uint16 needs {rows * cols * 2}",
            "frame",
        )


def _check_metadata(metadata: dict) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ProtocolError(
            f"header field 'metadata': {len(metadata)} entries, at most {MAX_METADATA_ENTRIES}",
            "video",
        )
    for key, value in metadata.items():
        if len(key) > MAX_NAME:
            raise ProtocolError(
                f"header field 'metadata': key of {len(key)} characters, at most {MAX_NAME}",
                "video",
            )
        if type(value) not in _SCALAR or (type(value) is str and len(value) > MAX_NAME) or (
            type(value) is int and not -INT64_MAX - 1 <= value <= INT64_MAX
        ):
            raise ProtocolError(
                f"header field 'metadata': {key!r} must be a number, bool, nil or a string "
                f"of at most {MAX_NAME} characters", "video",
            )


def _check_other(topic: str, header: dict) -> None:
    if topic == "video":
        if header["event"] not in _VIDEO_EVENTS:
            raise ProtocolError(f"header field 'event': {header['event']!r} not start/end", topic)
        _check_metadata(header["metadata"])
    elif topic == "status":
        latency = header["latency_us"]
        for key in _LATENCY_KEYS:
            if type(latency.get(key, _MISSING)) not in _OPT_NUMBER:
                raise ProtocolError(
                    f"header field 'latency_us': {key!r} missing or not a number", topic
                )
    elif topic == "alarm":
        if header["state"] not in _ALARM_STATES:
            raise ProtocolError(f"header field 'state': {header['state']!r} not raise/clear", topic)


def _valid_frame(header: dict, payload: Any, stream: str) -> bool:
    """True when a frame header and payload pass every check (the hot path, ~1 µs)."""
    try:
        values = _frame_values(header)
    except KeyError:
        return False
    if tuple(map(type, values)) != _FRAME_TYPES:
        return False
    v, stream_, video, type_, seq, index, t_ns, shape, dtype, obstacle = values
    if v != SCHEMA_VERSION or stream_ != stream or dtype != FRAME_DTYPE:
        return False
    if not (0 <= seq <= INT64_MAX and 0 <= index <= INT64_MAX and 0 <= t_ns <= INT64_MAX
            and 1 <= type_ <= N_TYPES):
        return False
    if obstacle not in _OBSTACLE_STATES or len(shape) != 2:
        return False
    if video not in _valid_names and not valid_name(video):
        return False
    rows, cols = shape
    return (
        type(rows) is int and type(cols) is int
        and 1 <= rows <= MAX_FRAME_SIDE and 1 <= cols <= MAX_FRAME_SIDE
        and len(payload) == rows * cols * 2
    )  # fmt: skip


_INT64 = struct.Struct(">q")  # msgpack's int64 body: big-endian


# ---------------------------------------------------------------- events on the wire

ALARM_FIELDS = (
    "v", "stream", "video", "type", "frame", "seq", "t_frame_ns", "t_alarm_ns", "kind",
    "state", "score", "threshold", "features",
)  # fmt: skip
"""An ``alarm`` header's fields, in order (``seq`` is the monitor's journal's to give)."""
VERDICT_FIELDS = (
    "v", "stream", "video", "type", "frames", "score", "anomalous", "alarms", "kinds", "t_ns",
    "partial",
)  # fmt: skip
"""A ``verdict`` header's fields, in order (``kinds``, ``t_ns``, ``partial``: the monitor's)."""


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def to_wire(event: Event, **extra: Any) -> tuple[str, dict[str, Any]]:
    """(topic, header) of an `Alarm` or a `Verdict` (TypeError for anything else): its
    fields, ``extra`` wire fields set over them, typed for the wire, and only the wire's
    (`ALARM_FIELDS`, `VERDICT_FIELDS`, in that order). ``v`` is set; a time left 0 (an
    alarm's ``t_alarm_ns``, a verdict's ``t_ns``) is now; an alarm's ``score`` and
    ``threshold`` are floats (NaN when absent) and its ``features`` values finite floats
    or None. ``encode`` still validates the result."""
    names: tuple[str, ...]
    if isinstance(event, Alarm):
        topic, names = "alarm", ALARM_FIELDS
    elif isinstance(event, Verdict):
        topic, names = "verdict", VERDICT_FIELDS
    else:
        raise TypeError(f"to_wire: {type(event).__name__} is no event (Alarm or Verdict)")
    fields = {name: getattr(event, name) for name in names if name != "v"}
    fields.update(extra)
    fields["v"] = SCHEMA_VERSION
    if topic == "verdict":
        fields["alarms"] = int(fields["alarms"])
        fields["anomalous"] = bool(fields["anomalous"])
        fields["score"] = float(fields["score"])
        fields["kinds"] = [str(k) for k in fields["kinds"] or []]
        fields["partial"] = bool(fields["partial"])
        if not fields["t_ns"]:
            fields["t_ns"] = time.monotonic_ns()
    else:
        if not fields["t_alarm_ns"]:
            fields["t_alarm_ns"] = time.monotonic_ns()
        fields["features"] = {str(k): _finite_or_none(v)
                              for k, v in dict(fields["features"] or {}).items()}
        for key in ("score", "threshold"):
            value = fields[key]
            fields[key] = math.nan if value is None else float(value)
    return topic, {k: fields[k] for k in names}


def from_wire(message: Message) -> Event:
    """The `Alarm` or `Verdict` of a decoded ``alarm`` or ``verdict`` message (its wire
    fields but ``v``; a verdict lacking the optional ``kinds``, ``t_ns``, ``partial`` gets
    [], 0, False; fields this version does not know are left out). ProtocolError for
    another topic."""
    header = message.header
    if message.topic == "alarm":
        return Alarm(**{k: header[k] for k in ALARM_FIELDS if k != "v"})
    if message.topic == "verdict":
        return Verdict(**{k: header[k] for k in VERDICT_FIELDS if k != "v" and k in header})
    raise ProtocolError(f"a {message.topic} message is no event (alarm or verdict)")
