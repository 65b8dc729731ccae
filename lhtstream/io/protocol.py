"""The wire protocol: ZeroMQ multipart ``[topic, header, payload?]``.

``topic`` is an ASCII word (so ZeroMQ prefix subscription selects it),
``header`` a msgpack map, ``payload`` raw bytes (only ``frame`` has one: the
frame's own ``<u2`` bytes in C order). ``docs/protocol.md`` is the
language-neutral contract; this module is its reference implementation.

Decoding sits on the monitor's per-frame hot path, so validation is plain dict
lookups and exact type checks (a few µs per frame), never a schema library.
The ``tap`` subcommand (``run_tap``) lives here too: it is the protocol's
human-readable view.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq

from lhtstream.base.errors import LhtstreamError

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"  #: replay binds, monitors connect
DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"  #: the monitor binds, subscribers connect
SCHEMA_VERSION = 1
"""Header field ``v``; bumped on any incompatible change."""

TOPICS: tuple[str, ...] = ("frame", "video", "status", "alarm", "verdict")

FRAME_DTYPE = "<u2"
"""The only pixel type of v1 frames: uint16, little-endian."""

_DTYPE = np.dtype(FRAME_DTYPE)

MAX_FRAME_SIDE = 32
"""The camera is 32x32 pixels; ROI rows and cols must lie in 1..32."""

MAX_HEADER_BYTES = 32 * 1024
"""Upper bound on a packed header (status with per-stream detail fits easily)."""

MAX_MESSAGE_BYTES = 64 * 1024
"""Bound for ZMQ_MAXMSGSIZE on subscribers (per part): a peer sending more is cut off."""

# msgpack limits: a hostile header cannot make the decoder allocate much.
_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=4096,
    max_map_len=4096,
    max_ext_len=0,
)

_unpack = functools.partial(msgpack.unpackb, **_UNPACK_LIMITS)  # no kwargs dict per call

_MISSING = object()
_NUMBER = (int, float)
_OPT_NUMBER = (int, float, type(None))


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
_TOPIC_BY_BYTES = {t.encode("ascii"): t for t in TOPICS}
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


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _check_fields(topic: str, header: dict) -> None:
    for name, types in _FIELDS[topic].items():
        value = header.get(name, _MISSING)
        if value is _MISSING:
            raise ProtocolError(f"header field {name!r} missing", topic)
        if type(value) not in types:
            expected = "/".join(t.__name__ for t in types)
            raise ProtocolError(
                f"header field {name!r}: expected {expected}, got {_type_name(value)}", topic
            )
    if header["v"] != SCHEMA_VERSION:
        raise ProtocolError(f"header field 'v': unknown schema version {header['v']}", topic)


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
            f"header field 'dtype': {header['dtype']!r}, v1 frames are {FRAME_DTYPE!r}", "frame"
        )
    if header["obstacle"] not in _OBSTACLE_STATES:
        raise ProtocolError(f"header field 'obstacle': {header['obstacle']} not 0/1/2", "frame")
    if header["seq"] < 0 or header["frame"] < 0:
        raise ProtocolError("header fields 'seq'/'frame' must be >= 0", "frame")
    size = len(payload)
    if size != rows * cols * 2:
        raise ProtocolError(
            f"payload: {size} bytes, shape {rows}x{cols} x uint16 needs {rows * cols * 2}",
            "frame",
        )


def _check_other(topic: str, header: dict) -> None:
    if topic == "video":
        if header["event"] not in _VIDEO_EVENTS:
            raise ProtocolError(f"header field 'event': {header['event']!r} not start/end", topic)
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


def _valid_frame(header: dict, payload: Any) -> bool:
    """True when a frame header and payload pass every check (the hot path, ~1 µs)."""
    try:
        values = _frame_values(header)
    except KeyError:
        return False
    if tuple(map(type, values)) != _FRAME_TYPES:
        return False
    v, _stream, _video, _type, seq, index, _t, shape, dtype, obstacle = values
    if v != SCHEMA_VERSION or dtype != FRAME_DTYPE or seq < 0 or index < 0:
        return False
    if obstacle not in _OBSTACLE_STATES or len(shape) != 2:
        return False
    rows, cols = shape
    return (
        type(rows) is int and type(cols) is int
        and 1 <= rows <= MAX_FRAME_SIDE and 1 <= cols <= MAX_FRAME_SIDE
        and len(payload) == rows * cols * 2
    )  # fmt: skip


def decode(parts: Sequence[Any]) -> Message:
    """Decode and validate one multipart message (bytes or zmq.Frame parts).

    Raises ProtocolError whose reason names the part or field at fault.
    """
    n = len(parts)
    if n < 2 or n > 3:
        raise ProtocolError(f"expected 2 or 3 parts, got {n}")
    raw_topic = parts[0]
    if type(raw_topic) is not bytes:
        raw_topic = bytes(raw_topic)
    topic = _TOPIC_BY_BYTES.get(raw_topic)
    if topic is None:
        raise ProtocolError(f"part 0: unknown topic {raw_topic[:32]!r}")
    raw_header = parts[1]
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"part 1: header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}", topic
        )
    try:
        header = _unpack(raw_header)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        reason = f"part 1: header is not msgpack ({type(exc).__name__})"
        raise ProtocolError(reason, topic) from None
    if type(header) is not dict:
        raise ProtocolError(f"part 1: header is a msgpack {_type_name(header)}, not a map", topic)
    if topic == "frame" and n == 3:
        payload = parts[2]
        if type(payload) is not bytes:  # zmq.Frame, memoryview: len() must count bytes
            payload = bytes(payload)
        if _valid_frame(header, payload):
            return Message(topic, header, payload)
    _check_fields(topic, header)
    if topic == "frame":
        if n != 3:
            raise ProtocolError("expected 3 parts (topic, header, payload), got 2", topic)
        _check_frame(header, payload)
        return Message(topic, header, payload)  # not reached: the fast path accepts it
    if n != 2:
        raise ProtocolError(f"expected 2 parts (topic, header), got {n}", topic)
    _check_other(topic, header)
    return Message(topic, header, None)


def frame_array(message: Message) -> np.ndarray:
    """The frame's pixels as a read-only (rows, cols) uint16 view over the payload (no copy)."""
    array = np.ndarray(tuple(message.header["shape"]), _DTYPE, message.payload)
    if array.flags.writeable:  # only when the payload was handed in as a mutable buffer
        array.flags.writeable = False
    return array


# ---------------------------------------------------------------- encoding


def _to_builtin(value: Any) -> Any:
    """msgpack fallback so producers may put numpy scalars/arrays in headers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a message header")


_packer = msgpack.Packer(default=_to_builtin, use_bin_type=True)


def encode(topic: str, header: dict[str, Any], payload: Any = None) -> list[bytes]:
    """Encode a message of any topic; ``v`` is filled in when absent.

    The result is decoded again before it is returned, so a producer can never
    send what a consumer would reject (ProtocolError). For frames on the hot
    path use ``encode_frame``.
    """
    topic_bytes = _TOPIC_BYTES.get(topic)
    if topic_bytes is None:
        raise ProtocolError(f"unknown topic {topic!r}")
    if "v" not in header:
        header = {"v": SCHEMA_VERSION, **header}
    try:
        packed = _packer.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"header cannot be encoded: {exc}", topic) from None
    parts: list[bytes] = [topic_bytes, packed]
    if payload is not None:
        parts.append(bytes(payload))
    decode(parts)
    return parts


class FrameEncoder:
    """Encodes frames of one stream with a reused header dict and msgpack Packer.

    The payload part is the array's own buffer (``memoryview``, no copy here;
    ZeroMQ copies the <2 KB into its message on send, which measured as fast
    as a zero-copy send for frames this small).
    """

    def __init__(self, stream: str) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._header: dict[str, Any] = {
            "v": SCHEMA_VERSION, "stream": str(stream), "video": "", "type": 0, "seq": 0,
            "frame": 0, "t_ns": 0, "shape": [0, 0], "dtype": FRAME_DTYPE, "obstacle": 0,
        }

    def encode(
        self, frame: np.ndarray, *, video: str, type: int, seq: int, index: int,
        t_ns: int, obstacle: int = 0,
    ) -> list[Any]:
        """Parts for one frame; ``frame`` must be a 2-D C-contiguous ``<u2`` array."""
        if frame.dtype.str != FRAME_DTYPE or not frame.flags.c_contiguous or frame.ndim != 2:
            raise ProtocolError(
                f"frame array must be 2-D C-contiguous {FRAME_DTYPE}, got "
                f"{frame.ndim}-D {frame.dtype.str}", "frame"
            )
        h = self._header
        h["video"] = video
        h["type"] = type
        h["seq"] = seq
        h["frame"] = index
        h["t_ns"] = t_ns
        h["shape"] = frame.shape
        h["obstacle"] = obstacle
        return [b"frame", self._packer.pack(h), frame.data]


def encode_frame(
    frame: np.ndarray, *, stream: str, video: str, type: int, seq: int, index: int,
    t_ns: int | None = None, obstacle: int = 0,
) -> list[Any]:
    """Parts for one frame (``t_ns`` defaults to now). Integer arrays are converted to ``<u2``."""
    if frame.dtype.str != FRAME_DTYPE or not frame.flags.c_contiguous:
        if frame.dtype.kind not in "ui":
            raise ProtocolError(f"frame array has dtype {frame.dtype}, need integers", "frame")
        frame = np.ascontiguousarray(frame, dtype=FRAME_DTYPE)
    rows, cols = frame.shape if frame.ndim == 2 else (0, 0)
    if not (1 <= rows <= MAX_FRAME_SIDE and 1 <= cols <= MAX_FRAME_SIDE):
        raise ProtocolError(f"frame array shape {frame.shape} is not 2-D within 1..32", "frame")
    header = {
        "v": SCHEMA_VERSION, "stream": stream, "video": video, "type": int(type), "seq": int(seq),
        "frame": int(index), "t_ns": time.monotonic_ns() if t_ns is None else int(t_ns),
        "shape": [rows, cols], "dtype": FRAME_DTYPE, "obstacle": int(obstacle),
    }
    return [b"frame", _packer.pack(header), frame.data]


# ---------------------------------------------------------------- sockets


def configure_subscriber(socket: Any, topics: Sequence[str] | None = None) -> None:
    """Bound message size and queue on a SUB socket and subscribe to topic prefixes.

    ``topics`` None or empty subscribes to everything. Call before connect.
    """

    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.RCVHWM, 10_000)
    socket.setsockopt(zmq.LINGER, 0)
    for topic in topics or [""]:
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
