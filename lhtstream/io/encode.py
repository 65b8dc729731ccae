"""Encoding messages: any topic (`encode`, validated by decoding), and frames on the
publisher's hot path (`FrameEncoder`, `EncodedFrames`, `encode_frame`)."""

from __future__ import annotations

import struct
import time
from typing import Any, cast

import msgpack
import numpy as np

from lhtstream.io.decode import decode
from lhtstream.io.schema import (
    _INT64,
    _TOPIC_BYTES,
    ALL_STREAMS,
    FRAME_DTYPE,
    MAX_FRAME_SIDE,
    SCHEMA_VERSION,
    ProtocolError,
    check_name,
    topic_bytes,
    valid_name,
)


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
    parts: list[bytes] = [topic_bytes(topic, cast(str, stream)), packed]
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
            self._template, offsets = _header_template(self._stream, video, type, *frame.shape)
            self._slots = (offsets["seq"], offsets["frame"], offsets["t_ns"], offsets["obstacle"])
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
        self.payloads = np.ascontiguousarray(frames).data.cast("B")
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
