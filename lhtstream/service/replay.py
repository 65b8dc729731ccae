"""Paced publisher: plays data-set videos as live 1000 fps camera streams over ZeroMQ.

Frame k of the run (counted per stream, all streams in step) is due at
``t0 + k / rate``: an absolute schedule, so a late frame never shifts later
ones (no drift; a stall is followed by a catch-up burst). The loop sleeps until
shortly before the due time and busy-waits the last ``spin_us`` to hit it.

The socket is an XPUB so the publisher can see subscriptions arrive and hold
the first frame until every stream has ``wait_subscribers`` frame subscribers (a PUB
drops what it sends before that; in a plant each stream may go to another monitor).
Videos are loaded one at a time per stream, with the next one prefetched on a worker
thread so loading does not stall the schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.curve import Curve
from lhtstream.io.curve import server as curve_server
from lhtstream.io.dataset import Dataset
from lhtstream.io.protocol import (
    DEFAULT_FRAME_ENDPOINT,
    FRAME_DTYPE,
    MAX_FRAME_SIDE,
    EncodedFrames,
    ProtocolError,
    check_name,
    encode,
    topic_bytes,
)

MAX_STREAMS = 1024
"""Streams one replay publishes at most (each holds one video in memory)."""
SEND_HWM = 10_000
"""Frames queued per subscriber before a paced PUB drops (10 s at 1 kHz); at ``--rate
max`` the send waits instead."""
SEND_WAIT_MS = 100
"""At ``--rate max``, how long one send waits for a full subscriber before it looks at
the stop flag and tries again."""


class ReplayError(LhtstreamError):
    """Replay cannot start or continue (bad selection, endpoint, video)."""


class Interrupted(BaseException):
    """A stop signal came while the replay waited for a load (`interrupt_load`). Not an
    `Exception`, like KeyboardInterrupt: a reader's ``except Exception`` must not take it
    for a bad file."""


_loading: list[str] = []  # what the main thread is waiting to load, innermost last


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Mark the main thread as waiting for ``what`` to load, for `interrupt_load`."""
    _loading.append(what)
    try:
        yield
    finally:
        _loading.pop()


def interrupt_load(signal_name: str) -> None:
    """For a signal handler in the main thread: raise `Interrupted` if the replay is
    waiting for a data set or video to load. A load can take unbounded time (a hostile
    pickle, a file on a stalled mount, a FIFO); the send loop's stop flag never sees it."""
    if _loading:
        raise Interrupted(f"replay: stopped by {signal_name} while loading {_loading[-1]}")


@dataclass
class ReplayStats:
    """What a run did. Jitter is actual minus scheduled send time of each tick, in µs."""

    frames_sent: int = 0
    frames_skipped: int = 0
    videos_started: int = 0
    ticks: int = 0
    seconds: float = 0.0
    streams: list[str] = field(default_factory=list)
    stopped: bool = False
    jitter_us: dict[str, float] | None = None

    def summary(self) -> str:
        rate = self.ticks / self.seconds if self.seconds > 0 else 0.0
        return (
            f"replay: {'stopped' if self.stopped else 'done'}: {self.frames_sent} frames "
            f"on {len(self.streams)} stream(s), {self.videos_started} video(s) started, "
            f"{self.seconds:.2f} s ({rate:.1f} frames/s per stream), "
            f"{self.frames_skipped} skipped"
        )

    def write_json(self, path: str | Path) -> None:
        """The summary as one JSON object (``--summary-json``), renamed into place whole.
        Fields: those of `ReplayStats`; ``jitter_us`` has n, p50, p99, p999, max (us) or
        is null (``--rate max``, or nothing sent)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(tmp, path)

    def jitter_line(self) -> str:
        if not self.jitter_us:
            return "replay: pacing jitter n/a (no paced frames sent)"
        j = self.jitter_us
        return (
            f"replay: pacing jitter p50={j['p50']:.0f} p99={j['p99']:.0f} "
            f"max={j['max']:.0f} us over {int(j['n'])} ticks"
        )


class _Jitter:
    """Histogram of lateness in 1 µs bins (exact percentiles at µs resolution, O(1) memory)."""

    BINS = 200_000  # up to 200 ms; anything later lands in the last bin (max kept exactly)

    def __init__(self) -> None:
        self.hist = np.zeros(self.BINS, dtype=np.int64)
        self.max_ns = 0
        self.n = 0

    def add(self, late_ns: int) -> None:
        us = late_ns // 1000
        self.hist[us if us < self.BINS else self.BINS - 1] += 1
        if late_ns > self.max_ns:
            self.max_ns = late_ns
        self.n += 1

    def percentiles(self) -> dict[str, float] | None:
        if self.n == 0:
            return None
        cumulative = np.cumsum(self.hist)
        out: dict[str, float] = {"n": float(self.n), "max": self.max_ns / 1000}
        for name, q in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999)):
            out[name] = float(np.searchsorted(cumulative, q * self.n))
        return out


def _load(video: Any, stream: str, first_seq: int) -> EncodedFrames:
    """A video's frame messages for ``stream``, numbered from ``first_seq``, encoded once
    (the frames converted to C-contiguous ``<u2``)."""
    frames = np.ascontiguousarray(video.load(), dtype=FRAME_DTYPE)
    obstacles = np.asarray(video.obstacle_states(), dtype=np.int64)
    n, rows, cols = frames.shape
    where = f"Type{video.type} video {video.name}"
    if not (1 <= rows <= MAX_FRAME_SIDE and 1 <= cols <= MAX_FRAME_SIDE):
        raise ReplayError(f"{where}: frames are {rows}x{cols}, outside 1..{MAX_FRAME_SIDE}")
    if len(obstacles) != n:
        raise ReplayError(f"{where}: {len(obstacles)} obstacle states for {n} frames")
    try:
        return EncodedFrames(stream, video.name, video.type, frames, obstacles, first_seq)
    except ProtocolError as exc:
        raise ReplayError(f"{where}: {exc}") from None


class _Stream:
    """One workstation: its playlist, position, ``seq`` and a prefetched next video."""

    def __init__(self, name: str, playlist: Sequence[Any], loop: bool,
                 loader: ThreadPoolExecutor) -> None:
        self.name = name
        self.playlist = playlist
        self.loop = loop
        self.loader = loader
        self.seq = 0
        self.position = -1  # index into playlist of the current video
        self.video: Any = None
        self.encoded: EncodedFrames | None = None  # the current video's frame messages
        self.index = 0
        self.count = 0
        self.finished = False
        self._next: Future | None = None
        self._empty_in_a_row = 0
        self._prefetch(0)
        self._advance()

    def _following(self) -> int | None:
        nxt = self.position + 1
        if nxt >= len(self.playlist):
            if not self.loop:
                return None
            nxt = 0
        return nxt

    def _prefetch(self, first_seq: int) -> None:
        nxt = self._following()
        self._next = None if nxt is None else self.loader.submit(
            _load, self.playlist[nxt], self.name, first_seq)

    def _advance(self) -> None:
        """Switch to the next video (waiting for its prefetch) or mark the stream finished."""
        nxt = self._following()
        if nxt is None or self._next is None:
            self.finished = True
            self.video = self.encoded = None
            return
        upcoming = self.playlist[nxt]
        with loading(f"Type{upcoming.type} video {upcoming.name}"):
            self.encoded = self._next.result()
        self.position = nxt
        self.video = self.playlist[nxt]
        self.count = self.encoded.count
        self.index = 0
        # every frame takes a seq, sent or skipped: the next video's first is known now
        self._prefetch(self.seq + self.count)
        if self.count == 0:
            # A zero-frame video still gets start/end; a whole playlist of them ends the stream.
            self._empty_in_a_row += 1
            if self._empty_in_a_row > len(self.playlist):
                self.finished = True
        else:
            self._empty_in_a_row = 0

    def video_message(self, event: str) -> list[bytes]:
        v = self.video
        return encode("video", {"stream": self.name, "video": v.name, "type": v.type,
                                "event": event, "metadata": dict(v.metadata)})


def _playlists(videos: list[Any], streams: int) -> list[list[Any]]:
    """Stream i plays the selection rotated by i*len/streams videos, so streams differ."""
    n = len(videos)
    return [videos[(i * n) // streams:] + videos[:(i * n) // streams] for i in range(streams)]


def replay(
    data: Any,
    endpoint: str = DEFAULT_FRAME_ENDPOINT,
    *,
    rate: float | None = 1000.0,
    loop: bool = False,
    types: Iterable[int] | None = None,
    videos: Iterable[str] | None = None,
    streams: int = 1,
    wait_subscribers: int = 1,
    stream_prefix: str = "ws",
    skip: Iterable[int] = (),
    stop: threading.Event | None = None,
    log: TextIO | None = sys.stderr,
    progress_interval: float = 5.0,
    spin_us: int = 200,
    curve: Curve | None = None,
) -> ReplayStats:
    """Publish the selected videos of data set ``data`` on ``endpoint``.

    ``rate`` is frames/s per stream (None: as fast as the slowest subscriber
    takes them, lossless). Stream names are ``<stream_prefix>1..K`` (``ws1..wsK``).
    ``skip`` lists seq numbers (per stream) not to send, leaving a gap. Returns when
    every stream has played its playlist (never with ``loop``) or ``stop`` is set.
    """

    if not 1 <= streams <= MAX_STREAMS:
        raise ReplayError(f"--streams must be 1..{MAX_STREAMS}, got {streams}")
    try:
        check_name(f"{stream_prefix}{streams}")
    except LhtstreamError as exc:
        raise ReplayError(f"--stream-prefix {stream_prefix!r}: {exc}") from None
    if rate is not None and not rate > 0:
        raise ReplayError(f"--rate must be > 0 or 'max', got {rate}")
    with loading(f"the data set {data}"):
        selection = list(Dataset(data).videos(types=types, names=videos))
    if not selection:
        raise ReplayError(f"{data}: no videos match the selection (types={types}, "
                          f"videos={videos})")
    stop = stop or threading.Event()
    skip_set = frozenset(int(s) for s in skip)

    def say(text: str) -> None:
        if log is not None:
            print(text, file=log, flush=True)

    context = zmq.Context()
    socket = context.socket(zmq.XPUB)
    curve_server(curve, context, socket)  # CURVE (io.curve) when keys are given
    socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, not only new topics
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.LINGER, 2000)  # deliver the tail at exit, but never hang on it
    if rate is None:
        # Lossless max-rate mode: a full subscriber queue blocks us instead of dropping.
        # The send waits inside libzmq (for the subscriber's side to report progress)
        # and gives up after SEND_WAIT_MS, so a stop request is seen. Not NOBLOCK + poll:
        # an XPUB always polls writable, so that loop spins (it made 1.5 `Again` per frame).
        socket.setsockopt(zmq.XPUB_NODROP, 1)
        socket.setsockopt(zmq.SNDTIMEO, SEND_WAIT_MS)
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-load")
    clean = False  # ended without an exception: wait for the loader thread
    stats = ReplayStats(streams=[f"{stream_prefix}{i + 1}" for i in range(streams)])
    # Frame subscriptions seen so far (XPUB_VERBOSE passes every one, duplicates too). A
    # subscriber of stream ws1 sent a prefix of b"frame/ws1/" (b"frame", b"frame/ws", ...);
    # a plant splitting streams over monitors has one such subscriber per stream.
    prefixes: list[bytes] = []
    topics = [topic_bytes("frame", name) for name in stats.streams]

    def subscribers() -> int:
        """Frame subscribers of the least-subscribed stream."""
        return min(sum(topic.startswith(p) for p in prefixes) for topic in topics)

    def drain_subscriptions() -> None:
        while socket.poll(0, zmq.POLLIN):
            msg = socket.recv()
            # A subscription is b"\x01" + prefix; keep those that select some frames.
            prefix = msg[1:]
            if msg[:1] == b"\x01" and any(t.startswith(prefix) for t in topics):
                prefixes.append(prefix)
                say(f"replay: frame subscriber joined ({subscribers()}) on every stream ("
                    f"prefix {prefix.decode('ascii', 'replace')!r})")

    try:
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ReplayError(f"cannot bind {endpoint}: {exc}") from None
        say(f"replay: {len(selection)} video(s), {streams} stream(s), "
            f"rate {'max' if rate is None else f'{rate:g}/s'} on {endpoint}")
        playlists = _playlists(selection, streams)
        lanes = [_Stream(name, playlist, loop, loader)
                 for name, playlist in zip(stats.streams, playlists, strict=True)]

        if wait_subscribers > 0:
            say(f"replay: waiting for {wait_subscribers} frame subscriber(s) of every stream")
            while subscribers() < wait_subscribers and not stop.is_set():
                if socket.poll(100, zmq.POLLIN):
                    drain_subscriptions()
        if stop.is_set():
            stats.stopped = clean = True
            return stats

        jitter = _Jitter()
        _run(socket, lanes, rate, skip_set, stop, stats, jitter, spin_us,
             drain_subscriptions, say, progress_interval)
        stats.jitter_us = jitter.percentiles() if rate is not None else None
        clean = True
        return stats
    finally:
        # after an error or an interrupted load (which may never end), do not wait for it
        loader.shutdown(wait=clean, cancel_futures=True)
        socket.close()
        if curve is not None:
            curve.close()
        context.term()


MAX_RATE_RUN = 256
"""Frames of one stream sent in a row at ``--rate max`` before the next stream's turn."""


def _run(socket: Any, lanes: list[_Stream], rate: float | None, skip: frozenset[int],
         stop: threading.Event, stats: ReplayStats, jitter: _Jitter, spin_us: int,
         drain_subscriptions: Any, say: Any, progress_interval: float) -> None:
    """The send loop. Paced: one tick per frame period, every active stream sends one
    frame. ``rate`` None: every stream in turn sends a run of frames as fast as the
    slowest subscriber takes them (lossless: the XPUB is NODROP, a full queue waits)."""
    monotonic_ns = time.monotonic_ns
    sleep = time.sleep
    spin_ns = spin_us * 1000
    period_ns = None if rate is None else 1e9 / rate
    run = 1 if rate is not None else MAX_RATE_RUN
    send = socket.send
    t0 = monotonic_ns()
    next_housekeeping = t0 + 250_000_000
    next_progress = t0 + int(progress_interval * 1e9)
    tick = 0
    active = [lane for lane in lanes if not lane.finished]
    while active and not stop.is_set():
        advanced = False  # only _advance() can finish a lane
        if period_ns is not None:
            due = t0 + int(tick * period_ns)
            now = monotonic_ns()
            while now < due - spin_ns:
                # Sleep in short pieces so SIGTERM stops even a slow (--rate 1) replay.
                sleep(min((due - spin_ns - now) / 1e9, 0.05))
                now = monotonic_ns()
                if stop.is_set():
                    break
            if stop.is_set():
                break
            while now < due:
                now = monotonic_ns()
            jitter.add(now - due)
        for lane in active:
            if lane.index == 0:
                _send_whole(socket, lane.video_message("start"), stop)
                stats.videos_started += 1
            if lane.count:
                _send_frames(send, lane, run, skip, stats, stop)
            if lane.index >= lane.count:
                _send_whole(socket, lane.video_message("end"), stop)
                lane._advance()
                advanced = True
        tick += 1
        if advanced:
            active = [lane for lane in active if not lane.finished]
        now = monotonic_ns()
        if now >= next_housekeeping:
            next_housekeeping = now + 250_000_000
            drain_subscriptions()
            if now >= next_progress:
                next_progress = now + int(progress_interval * 1e9)
                say(f"replay: {(now - t0) / 1e9:.1f} s, {stats.frames_sent} frames sent, "
                    f"{stats.videos_started} video(s) started")
    stats.ticks = tick if rate is not None else (
        (stats.frames_sent + stats.frames_skipped) // max(1, len(lanes)))
    stats.seconds = (monotonic_ns() - t0) / 1e9
    stats.stopped = stop.is_set()


_MORE = int(zmq.SNDMORE)  # an int, not pyzmq's flag enum: combining those costs ~1 µs


def _send_frames(send: Any, lane: _Stream, n: int, skip: frozenset[int],
                 stats: ReplayStats, stop: threading.Event) -> None:
    """Send up to ``n`` frames of ``lane``'s video from its position, each stamped with
    ``t_ns`` = now. A lossless XPUB (``--rate max``) waits in a message's first part while
    a subscriber's queue is full, up to SEND_WAIT_MS (then ``Again``: the frame is tried
    again, stamped anew); once the first part is queued, libzmq takes the rest of the
    message at once. A lossy (paced) XPUB never waits: it drops for a full subscriber."""
    monotonic_ns = time.monotonic_ns
    enc = lane.encoded
    assert enc is not None
    topic, stamp = enc.topic, enc.stamp
    payloads, size = enc.payloads, enc.payload_size
    i, seq = lane.index, lane.seq
    end = min(i + n, lane.count)
    sent = 0
    while i < end:
        if skip and seq in skip:
            stats.frames_skipped += 1
        else:
            header = stamp(i, monotonic_ns())
            try:
                send(topic, _MORE)
            except zmq.Again:
                if stop.is_set():
                    break
                continue
            send(header, _MORE)
            send(payloads[i * size:(i + 1) * size])
            sent += 1
        i += 1
        seq += 1
    lane.index, lane.seq = i, seq
    stats.frames_sent += sent


def _send_whole(socket: Any, parts: list[Any], stop: threading.Event) -> None:
    """A (video) message; at ``--rate max`` it waits, like a frame, for a full subscriber."""
    while True:
        try:
            socket.send(parts[0], _MORE)
            break
        except zmq.Again:
            if stop.is_set():
                return
    for part in parts[1:-1]:
        socket.send(part, _MORE)
    socket.send(parts[-1])
