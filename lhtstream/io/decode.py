"""Decoding and validating messages (`decode`), with the fast path for frames whose
publisher writes fixed-width headers (`_FrameLayout`), and frames as arrays
(`frame_array`, `FrameBuffer`)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, cast

import msgpack
import numpy as np

from lhtstream.io.schema import (
    _INT64,
    _KNOWN_CAP,
    _OBSTACLE_STATES,
    _ZMQ_FRAME,
    FRAME_DTYPE,
    MAX_HEADER_BYTES,
    Message,
    ProtocolError,
    _check_fields,
    _check_frame,
    _check_other,
    _new_message,
    _route,
    _type_name,
    _unpack,
    _valid_frame,
)

_DTYPE = np.dtype(FRAME_DTYPE)

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
            self._bytes = self._array.data.cast("B")
            self._shape = list(shape)
        # via memoryview(): assigning a zmq.Frame itself to a memoryview slice segfaults
        # (pyzmq 27)
        self._bytes[:] = memoryview(cast(bytes, message.payload))
        return self._array
