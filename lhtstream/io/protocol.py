"""The wire protocol: ZeroMQ multipart ``[topic, header, payload?]``.

``topic`` is ``<kind>/<stream>/`` in ASCII (``frame/ws1/``, ``status/*/``): ZeroMQ's
prefix subscription then selects a kind (``frame``), one stream of it (``frame/ws1/``,
the trailing ``/`` keeps ``ws1`` from matching ``ws10``) or a family of streams
(``frame/line2-``). ``header`` is a msgpack map, ``payload`` raw bytes (only ``frame``
has one: the frame's own ``<u2`` bytes in C order). ``docs/protocol.md`` is the
language-neutral contract; this module is its reference implementation.

Everything that comes from outside is bounded here: names (``stream``, ``video``,
``kind``) are 1..64 characters of ``A-Z a-z 0-9 _ . -``, integers lie within int64 and
their field's range (``type`` 1..36, counters and times >= 0), maps and lists are
short. Decoding sits on the monitor's per-frame hot path, so a valid frame is checked
with one C-level field fetch, one tuple of exact types and a few comparisons (names
already seen are looked up in a bounded set), never a schema library.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket as _socket
import stat
import struct
import time
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.selection import N_TYPES

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"  #: replay binds, monitors connect
DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"  #: the monitor binds, subscribers connect
SCHEMA_VERSION = 2
"""Header field ``v``; bumped on any incompatible change (2: stream in the topic, bounds)."""

TOPICS: tuple[str, ...] = ("frame", "video", "status", "alarm", "verdict")

FRAME_DTYPE = "<u2"
"""The only pixel type of frames: uint16, little-endian."""

_DTYPE = np.dtype(FRAME_DTYPE)

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


_SLOT_KEYS = ("seq", "frame", "t_ns", "obstacle")  # what changes from frame to frame
_SLOT_TAGS = tuple(msgpack.packb(key) + b"\xd3" for key in _SLOT_KEYS)  # key, int64 format
_SENTINELS = (0x0102030405060708, 0x1112131415161718, 0x2122232425262728, 2)  # obstacle 2


class _FrameLayout:
    """The byte layout of one stream's frame headers when its publisher writes the
    per-frame integers as fixed-width msgpack int64 (`EncodedFrames`, our replay): then
    a header is its previous one with four 8-byte slots changed, and one `struct` unpack
    plus a tuple comparison of the fixed bytes decode and validate it (~3x cheaper than
    msgpack and the field checks). Learnt from a header that passed every check, and
    proven on it: sentinel values written into the slots must come out of msgpack in
    exactly those fields, so a header this layout accepts is one msgpack would decode to
    the same map, with every field but the four checked already."""

    def __init__(self, raw: bytes, header: dict[str, Any], payload_size: int,
                 slots: list[tuple[int, str]]) -> None:
        fmt, pos = ">", 0
        for at, _key in slots:
            fmt += f"{at - pos}sq"
            pos = at + 8
        self._unpack = struct.Struct(fmt + f"{len(raw) - pos}s").unpack
        self.size = len(raw)
        keys = [key for _at, key in slots]
        # unpacked: fixed bytes, int, fixed bytes, int, ..., fixed bytes
        self._fixed_of = itemgetter(*range(0, 2 * len(slots) + 1, 2))
        self._ints_of = itemgetter(*(2 * keys.index(key) + 1 for key in _SLOT_KEYS))
        self.fixed = self._fixed_of(self._unpack(raw))
        self.header = dict(header)
        self.payload_size = payload_size

    @staticmethod
    def learn(raw: bytes, header: dict[str, Any], payload_size: int) -> _FrameLayout | None:
        """The layout of ``raw`` (whose valid decoding is ``header``), None if it has none."""
        slots = []
        for key, tag in zip(_SLOT_KEYS, _SLOT_TAGS, strict=True):
            at = raw.find(tag)
            if at < 0 or raw.find(tag, at + 1) >= 0:
                return None  # no single int64 slot: written with the smallest int formats
            slots.append((at + len(tag), key))
        slots.sort()
        probe = bytearray(raw)
        sentinels = dict(zip(_SLOT_KEYS, _SENTINELS, strict=True))
        for at, key in slots:
            _INT64.pack_into(probe, at, sentinels[key])
        if _unpack(bytes(probe)) != dict(header, **sentinels):
            return None  # the tags were not where those fields are
        return _FrameLayout(raw, header, payload_size, slots)

    def decode(self, raw: Any, payload: Any) -> dict[str, Any] | None:
        """The header ``raw`` decodes to, if it has this layout and valid values."""
        if len(raw) != self.size or len(payload) != self.payload_size:
            return None
        values = self._unpack(raw)
        if self._fixed_of(values) != self.fixed:
            return None
        seq, frame, t_ns, obstacle = self._ints_of(values)
        if seq < 0 or frame < 0 or t_ns < 0 or obstacle not in _OBSTACLE_STATES:
            return None
        # one C call (a copy and four stores in Python cost 2.5x as much); the keys keep
        # the template's order
        return dict(self.header, seq=seq, frame=frame, t_ns=t_ns, obstacle=obstacle)


_layouts: dict[bytes, _FrameLayout | None] = {}  # per frame topic: its publisher's layout


def _learn_layout(raw_topic: bytes, raw_header: Any, header: dict[str, Any],
                  payload_size: int) -> None:
    if len(_layouts) >= _KNOWN_CAP:
        _layouts.clear()
    _layouts[raw_topic] = _FrameLayout.learn(bytes(raw_header), header, payload_size)


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
    raw_header = parts[1]
    if n == 3:
        payload = parts[2]
        if type(payload) is not bytes and type(payload) is not _ZMQ_FRAME:
            payload = bytes(payload)  # a memoryview's len() need not count bytes
        # a layout is only learnt for a valid frame topic: its route needs no check
        layout = _layouts.get(raw_topic)
        if layout is not None:
            header = layout.decode(raw_header, payload)
            if header is not None:
                return _new_message(Message, ("frame", header, payload))
    topic, stream = _route(raw_topic)
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
        if _valid_frame(header, payload, stream):
            _learn_layout(raw_topic, raw_header, header, len(payload))
            return Message(topic, header, payload)
    _check_fields(topic, header, stream)
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
    payload = message.payload
    array = np.ndarray(message.header["shape"], _DTYPE, payload)
    if type(payload) is not bytes and array.flags.writeable:  # a mutable buffer handed in
        array.flags.writeable = False
    return array


class FrameBuffer:
    """One stream's frames copied off the wire into one reused (rows, cols) uint16 array:
    copying a frame's bytes costs about two thirds of building an array over each
    payload (`frame_array`: 0.25 vs 0.40 µs), and the pipeline then sees one array, so
    the monitor's per-frame path uses this. The array returned by `load` is
    overwritten by the next `load`; keep a copy to hold a frame longer."""

    def __init__(self) -> None:
        self._shape: list[int] | None = None  # the first `load` makes the array
        self._array: np.ndarray
        self._bytes: memoryview

    def load(self, message: Message) -> np.ndarray:
        """The pixels of a decoded frame ``message``, in this buffer's array."""
        shape = message.header["shape"]
        if shape != self._shape:  # a new ROI: at a video boundary, off the hot path
            self._array = np.zeros((shape[0], shape[1]), dtype=_DTYPE)
            self._bytes = memoryview(self._array).cast("B")
            self._shape = list(shape)
        # via memoryview(): assigning a zmq.Frame itself to a memoryview slice segfaults
        # (pyzmq 27)
        self._bytes[:] = memoryview(message.payload)
        return self._array


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
_INT64 = struct.Struct(">q")  # msgpack's int64 body: big-endian


def encode(topic: str, header: dict[str, Any], payload: Any = None) -> list[bytes]:
    """Encode a message of any topic (the topic part from ``header["stream"]``); ``v`` is
    filled in when absent.

    The result is decoded again before it is returned, so a producer can never
    send what a consumer would reject (ProtocolError). For frames on the hot
    path use ``FrameEncoder``.
    """
    if topic not in _TOPIC_BYTES:
        raise ProtocolError(f"unknown topic {topic!r}")
    stream = header.get("stream")
    if not (valid_name(stream) or (stream == ALL_STREAMS and topic == "status")):
        check_name(stream)  # raises with the reason
    if "v" not in header:
        header = {"v": SCHEMA_VERSION, **header}
    try:
        packed = _packer.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"header cannot be encoded: {exc}", topic) from None
    parts: list[bytes] = [topic_bytes(topic, stream), packed]
    if payload is not None:
        parts.append(bytes(payload))
    decode(parts)
    return parts


_INT64_SLOT = b"\xd3" + bytes(8)  # msgpack int64, its value written in later


def _header_template(stream: str, video: str, type: int, rows: int,
                     cols: int) -> tuple[bytes, dict[str, int]]:
    """A frame header with the per-frame ints (``seq``, ``frame``, ``t_ns``, ``obstacle``)
    as fixed-width msgpack int64 slots (any msgpack int format is a valid int,
    docs/protocol.md), and the byte offset of each slot's value: every frame of a video
    then has a header of one length and layout, made by writing four slots."""
    pack = _packer.pack
    parts = [b"\x8a" + b"".join(pack(k) + pack(v) for k, v in (
        ("v", SCHEMA_VERSION), ("stream", stream), ("video", video), ("type", type)))]
    offsets: dict[str, int] = {}
    for key in ("seq", "frame", "t_ns"):
        parts.append(pack(key))
        offsets[key] = sum(map(len, parts)) + 1
        parts.append(_INT64_SLOT)
    parts += [pack("shape") + pack([rows, cols]) + pack("dtype") + pack(FRAME_DTYPE),
              pack("obstacle")]
    offsets["obstacle"] = sum(map(len, parts)) + 1
    parts.append(_INT64_SLOT)
    return b"".join(parts), offsets


class FrameEncoder:
    """Encodes frames of one stream, one header template per video (`_header_template`:
    a frame's header is the template with its four ints written in, ~3x cheaper than
    packing a map, and decoded by the receiver's layout fast path).

    The payload part is the array's own buffer (``memoryview``, no copy here;
    ZeroMQ copies the <2 KB into its message on send, which measured as fast
    as a zero-copy send for frames this small). Fields are not validated here
    (the hot path of a publisher); a receiver rejects what is out of bounds.
    """

    def __init__(self, stream: str) -> None:
        self._stream = check_name(stream)
        self._topic = topic_bytes("frame", stream)
        self._key: tuple[Any, ...] | None = None
        self._template = b""
        self._slots: tuple[int, int, int, int] = (0, 0, 0, 0)

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
        key = (video, type, frame.shape)
        if key != self._key:
            self._template, at = _header_template(self._stream, video, type, *frame.shape)
            self._slots = (at["seq"], at["frame"], at["t_ns"], at["obstacle"])
            self._key = key
        header = bytearray(self._template)
        pack_into = _INT64.pack_into
        try:
            for at, value in zip(self._slots, (seq, index, t_ns, obstacle), strict=True):
                pack_into(header, at, value)
        except struct.error:
            raise ProtocolError("header field seq, frame, t_ns or obstacle: not an int64",
                                "frame") from None
        return [self._topic, bytes(header), frame.data]


class EncodedFrames:
    """Every frame message of one video, encoded up front in a few numpy operations.

    Headers from one `_header_template` (fixed-width ints, so all of one length and
    layout) lie back to back in ``headers``, ``header_size`` bytes each, and sending
    frame ``i`` only stamps its ``t_ns`` (8 bytes at ``t_ns_offset`` in its header, see
    `stamp`) right before the send. ``payloads`` holds the pixels, ``payload_size`` bytes
    per frame. The first and last messages are decoded here, so a video whose fields a
    receiver would reject (a bad name or type) fails before anything is sent.
    """

    def __init__(self, stream: str, video: str, type: int, frames: np.ndarray,
                 obstacles: Any, first_seq: int) -> None:
        if frames.dtype.str != FRAME_DTYPE or frames.ndim != 3:
            raise ProtocolError(f"frames must be (n, rows, cols) {FRAME_DTYPE}, got "
                                f"{frames.ndim}-D {frames.dtype.str}", "frame")
        n, rows, cols = frames.shape
        self.topic = topic_bytes("frame", check_name(stream))
        self.count = n
        raw, offsets = _header_template(stream, str(video), int(type), rows, cols)
        template = np.frombuffer(raw, dtype=np.uint8)
        size = self.header_size = template.size
        self.t_ns_offset = offsets["t_ns"]
        table = np.empty((n, size), dtype=np.uint8)
        table[:] = template
        index = np.arange(n, dtype=np.int64)
        for key, values in (("seq", index + int(first_seq)), ("frame", index),
                            ("obstacle", np.asarray(obstacles, dtype=np.int64))):
            at = offsets[key]
            table[:, at:at + 8] = values.astype(">i8").view(np.uint8).reshape(n, 8)
        self.headers = bytearray(table.tobytes())
        self._headers = memoryview(self.headers)
        self.payload_size = rows * cols * 2
        self.payloads = memoryview(np.ascontiguousarray(frames)).cast("B")
        self._stamp = _INT64.pack_into
        for i in {0, n - 1} if n else ():
            decode(self.parts(i, 0))

    def stamp(self, i: int, t_ns: int) -> memoryview:
        """Frame ``i``'s header with ``t_ns`` written into it (a view, valid until the next
        stamp of the same frame)."""
        at = i * self.header_size
        self._stamp(self.headers, at + self.t_ns_offset, t_ns)
        return self._headers[at:at + self.header_size]

    def parts(self, i: int, t_ns: int) -> list[Any]:
        """The three parts of frame ``i`` sent at ``t_ns``."""
        at = i * self.payload_size
        return [self.topic, self.stamp(i, t_ns), self.payloads[at:at + self.payload_size]]


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
        "v": SCHEMA_VERSION, "stream": check_name(stream), "video": video, "type": int(type),
        "seq": int(seq), "frame": int(index),
        "t_ns": time.monotonic_ns() if t_ns is None else int(t_ns),
        "shape": [rows, cols], "dtype": FRAME_DTYPE, "obstacle": int(obstacle),
    }
    return [topic_bytes("frame", stream), _packer.pack(header), frame.data]


# ---------------------------------------------------------------- stream selection


_WILDCARDS = re.compile(r"[*?\[]")


class StreamSelection:
    """Which streams a subscriber takes: names and shell-style patterns (``ws1,line2-*``).

    ``prefixes(topic)`` are the ZeroMQ subscriptions that let only matching streams'
    messages through, as far as a prefix can: an exact name subscribes ``frame/ws1/``
    (exactly that stream); a pattern subscribes to its literal part before the first
    wildcard (``line2-*`` -> ``frame/line2-``: exact; ``ws?1`` -> ``frame/ws``: also
    ``ws22`` gets through). ``exact`` says whether the prefixes alone decide; if not,
    ``matches`` (cached per name) rejects the rest in the receiver.
    """

    def __init__(self, text: str | Iterable[str] | None) -> None:
        items = text.split(",") if isinstance(text, str) else list(text or [])
        self.names: set[str] = set()
        self.patterns: list[str] = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            if _WILDCARDS.search(item):
                literal = _WILDCARDS.split(item, 1)[0]
                if literal and not valid_name(literal):
                    raise ProtocolError(f"stream pattern {item!r}: its literal part "
                                        f"{literal!r} is no stream name prefix ({NAME_CHARS})")
                self.patterns.append(item)
            else:
                self.names.add(check_name(item))
        if isinstance(text, str) and not (self.names or self.patterns):
            raise ProtocolError(f"stream selection {text!r} names no stream")
        self._cache: dict[str, bool] = {}
        # A pattern is filtered exactly by its prefix when its only wildcard is a final '*'.
        self.exact = all(p.endswith("*") and not _WILDCARDS.search(p[:-1])
                         for p in self.patterns)

    @property
    def everything(self) -> bool:
        return not self.names and not self.patterns

    def prefixes(self, topic: str) -> list[bytes]:
        """ZeroMQ SUBSCRIBE prefixes for ``topic``'s messages of the selected streams."""
        if self.everything:
            return [_TOPIC_BYTES[topic] + b"/"]
        out = {topic_bytes(topic, name) for name in self.names}
        for pattern in self.patterns:
            literal = _WILDCARDS.split(pattern, 1)[0]
            out.add(_TOPIC_BYTES[topic] + b"/" + literal.encode("ascii"))
        # A prefix that another one contains adds nothing (ZeroMQ would deliver once anyway).
        return sorted(p for p in out if not any(q != p and p.startswith(q) for q in out))

    def matches(self, stream: str) -> bool:
        """True when ``stream`` is selected (a dict lookup after the first time)."""
        hit = self._cache.get(stream)
        if hit is None:
            hit = self.everything or stream in self.names or any(
                fnmatch.fnmatchcase(stream, p) for p in self.patterns)
            if len(self._cache) >= _KNOWN_CAP:
                self._cache.clear()
            self._cache[stream] = hit
        return hit

    def __str__(self) -> str:
        return "all streams" if self.everything else ",".join(
            sorted(self.names) + self.patterns)


# ---------------------------------------------------------------- sockets


def configure_subscriber(
    socket: Any, topics: Sequence[str] | None = None, streams: StreamSelection | None = None
) -> None:
    """Bound message size and queue on a SUB socket and subscribe.

    ``topics`` None or empty subscribes to every topic; ``streams`` (default all) narrows
    each topic to the selected streams by prefix; an item of ``topics`` that is no topic
    name is subscribed as a raw prefix (``frame/ws1/``). Call before connect.
    """
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.RCVHWM, 10_000)
    socket.setsockopt(zmq.LINGER, 0)
    if not topics and (streams is None or streams.everything):
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        return
    selection = streams or StreamSelection(None)
    for topic in topics or TOPICS:
        # a topic name is narrowed to the selected streams; anything else is a raw prefix
        prefixes = selection.prefixes(topic) if topic in _TOPIC_BYTES else [topic.encode()]
        for prefix in prefixes:
            socket.setsockopt(zmq.SUBSCRIBE, prefix)


def claim_ipc(endpoint: str) -> None:
    """Make ``endpoint`` safe to bind if it is ``ipc://PATH``: a socket file there whose
    owner is alive (it accepts a connection) raises ProtocolError, so a second process
    never silently takes the endpoint from the first (libzmq would unlink and rebind
    it); a stale one (owner gone: connection refused) is removed. Other endpoints and
    abstract ``ipc://@name`` ones are left to ``bind``."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://"):]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProtocolError(f"{endpoint}: cannot look at {path} ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ProtocolError(f"{endpoint}: {path} exists and is no socket; not binding over it")
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left behind by a process that died
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProtocolError(f"{endpoint}: cannot probe {path} ({exc})") from None
    finally:
        probe.close()
    raise ProtocolError(f"{endpoint} is in use by a running process (another monitor?): "
                        "refusing to take it over; stop that one or choose another endpoint")
