"""What the monitor keeps per stream: its state and counters (`StreamState`), the block
of queued frames waiting for one compiled step (`FrameBlock`), and the token bucket
that bounds what a stream's peer can make the monitor journal (`TokenBucket`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lhtstream.io import protocol
from lhtstream.service.latency import LatencyRecorder

BLOCK_FRAMES = 64
"""Most frames of one stream stepped in one call (`StreamPipeline.process_block`) when
they arrive queued; a frame that finds the queue empty behind it is never held back."""
_MAX_FRAME_PIXELS = protocol.MAX_FRAME_SIDE ** 2
COUNTED = ("frames", "dropped", "malformed", "bad_time", "short_videos", "suppressed")
"""What a stream counts (`StreamState` attributes); the monitor's totals are their sums."""


class TokenBucket:
    """At most ``burst`` takes at once, refilled at ``rate`` per second (monotonic clock)."""

    def __init__(self, burst: float, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = burst
        self._t = time.monotonic()

    def take(self) -> bool:
        """Take one token: True when there was one."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def give(self) -> None:
        """Return a token taken before (its use proved legitimate)."""
        self._tokens = min(self.burst, self._tokens + 1.0)


class FrameBlock:
    """Frames of one stream, consecutive in ``seq`` and in one video, waiting to be
    stepped in one call: their pixels are copied into a preallocated buffer, and of their
    headers only what differs from the first frame's (``obstacle``, ``t_ns``) and the
    receive time are kept. A frame with nothing queued behind it is a block of one (one
    bookkeeping path for both)."""

    def __init__(self, capacity: int = BLOCK_FRAMES) -> None:
        self.capacity = capacity
        self._pixels = np.zeros(capacity * _MAX_FRAME_PIXELS, dtype=np.uint16)
        self._bytes = memoryview(self._pixels).cast("B")
        self.n = 0
        self.header: dict[str, Any] = {}  # the first frame's
        self.obstacles: list[int] = []
        self.t_ns: list[int] = []
        self.t_recv: list[int] = []
        self.t_ns0 = self.t_recv0 = self.t_recv_last = 0  # the first and last frame's
        self._size = 0  # payload bytes per frame
        self._shape: list[int] | None = None
        self._first = self._pixels[:0]  # the first frame, (rows, cols): a block of one

    def start(self, header: dict[str, Any], payload: Any, t_recv: int) -> None:
        """Begin a block with this frame (any frames it held are dropped)."""
        self.header = header
        size = self._size = len(payload)
        shape = header["shape"]
        if shape != self._shape:  # a new ROI: at a video boundary, off the hot path
            self._shape = list(shape)
            self._first = self._pixels[:shape[0] * shape[1]].reshape(shape[0], shape[1])
        # via memoryview(): assigning a zmq.Frame itself to a memoryview slice segfaults
        # (pyzmq 27)
        self._bytes[:size] = memoryview(payload)
        # the first frame's times as plain ints: a block of one (the 1 kHz path) builds no
        # lists; `append` makes them when a second frame joins
        self.t_ns0 = header["t_ns"]
        self.t_recv0 = self.t_recv_last = t_recv
        self.n = 1

    def continues(self, header: dict[str, Any]) -> bool:
        """True when ``header`` is the next frame of the block's video (its seq is the
        caller's to check) with the same frame shape."""
        first = self.header
        return (header["frame"] == first["frame"] + self.n and header["video"] == first["video"]
                and header["type"] == first["type"] and header["shape"] == first["shape"])

    def append(self, header: dict[str, Any], payload: Any, t_recv: int) -> None:
        if self.n == 1:
            self.obstacles = [self.header["obstacle"]]
            self.t_ns = [self.t_ns0]
            self.t_recv = [self.t_recv0]
        at = self.n * self._size
        # via memoryview(): assigning a zmq.Frame itself to a memoryview slice segfaults
        # (pyzmq 27)
        self._bytes[at:at + self._size] = memoryview(payload)
        self.obstacles.append(header["obstacle"])
        self.t_ns.append(header["t_ns"])
        self.t_recv.append(t_recv)
        self.t_recv_last = t_recv
        self.n += 1

    def step(self, pipeline: Any) -> Any:
        """Run the block through ``pipeline`` (one `process_block` call, or `process` for a
        single frame) and empty it; the events."""
        n = self.n
        self.n = 0  # taken, whatever happens below
        if n == 1:
            return pipeline.process(self._first, self.header)
        rows, cols = self._shape or (0, 0)
        frames = self._pixels[:n * rows * cols].reshape(n, rows, cols)
        return pipeline.process_block(frames, self.obstacles, self.header, self.t_ns)


class StreamState:
    """What the monitor knows about one stream: its pipeline, counters and position."""

    def __init__(self, name: str, pipeline: Any, now_ns: int) -> None:
        self.name = name
        self.pipeline = pipeline
        self.frames = 0
        self.dropped = 0
        self.malformed = 0
        self.bad_time = 0  # frames whose t_ns was implausible (replaced by the receipt time)
        self.last_seq: int | None = None
        self.video: str | None = None  # the video the pipeline is in, None between videos
        self.type = 0
        self.frame = -1
        self.seen_ns = now_ns  # monotonic ns of the last message: idle streams are evicted
        self.videos = 0
        self.video_frames = 0  # frames of the open video handled
        self.workpiece = False  # the open video reached MIN_WORKPIECE_FRAMES
        self.established = False  # some video of this stream was a workpiece
        # The open video took a token of the short-video budget (its start and events are
        # journaled as they come); False: they are held back in `held` until it proves a
        # workpiece (`opened`: its journal start row, waiting too).
        self.recorded = True
        self.held: list[Any] = []
        self.held_open: dict[str, Any] | None = None
        self.short_videos = 0  # held-back videos that ended before MIN_WORKPIECE_FRAMES
        self.suppressed = 0  # their events, dropped (or beyond MAX_HELD_EVENTS)
        # True while the open video did not begin with its `video start` (joined mid-video,
        # or the start was lost): its verdict covers part of the video only.
        self.partial = False
        self.latency = LatencyRecorder()
        # the latency interval the last monitor status covered, until this stream's own
        self.interval: LatencyRecorder | None = None
        self.block = FrameBlock()
        self.frame_topic = protocol.topic_bytes("frame", name)
        # A run of consecutive frames off the stream's line (seq backwards or far ahead,
        # or another video without its `video start`) means the publisher restarted or
        # its `video start` was lost: after RESTART_RUN of them the stream follows them.
        self.restart_next: int | None = None
        self.restart_key: tuple[str, int] | None = None  # (video, type) of the run
        self.restart_run = 0
        # A publisher (re)starting sends `video start`, then seq 0: that pair re-bases at once.
        self.video_start_seen = False


def model_state(pipeline: Any, st: dict[str, Any]) -> str:
    """A human-readable model state for status ("self-calibrating (3.2 s left)", ...).

    ``st`` is ``pipeline.status()``, passed in because the caller publishes it too.
    """
    if st.get("mode") == "calibrating":
        left = (1.0 - float(st.get("calibration_progress", 0.0))) * pipeline.calibration_frames
        return f"self-calibrating Type{st.get('type')} ({left / 1000:.1f} s of footage left)"
    if st.get("model") == "self-calibrated":
        return f"self-calibrated ({st.get('mode')})"
    if st.get("model") == "file":
        return f"model file ({st.get('mode')})"
    return str(st.get("mode"))
