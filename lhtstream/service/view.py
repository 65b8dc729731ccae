"""The live view's service (``lhtstream view``): a web page of the monitors and their
streams, and ``/metrics``. The CLI (cli/view.py) parses options and calls `serve`.

A separate process, so it can never slow a monitor: it is one more subscriber of the
monitors' ``status``/``alarm``/``verdict`` topics and of the frame stream. ZeroMQ PUB
sockets drop for a subscriber whose queue is full, so a view that falls behind loses
its own messages, never anyone else's; and the view itself decodes only the newest
frame of each stream for pictures, plus a burst of consecutive frames once a second
for the spot's path, and skips the rest undecoded (the stream is in the topic).

Threads: one receive thread owns every ZeroMQ socket and updates a `ViewState` under
a lock; the HTTP/WebSocket server (aiohttp) runs an asyncio loop in the main thread and
sends each page ~25 pictures/s and ~4 state updates/s. A page whose connection cannot
take a picture yet (its send buffer is still full) skips that picture: a slow page
drops pictures, it never delays the receive thread nor other pages. Drawing is done
by the browser (Plotly.js, served from the installed ``plotly`` package, and a canvas
for the 32x32 heat map).

Endpoints: ``/`` the page, ``/ws`` its WebSocket, ``/api/state`` the same state as JSON,
``/api/history`` alarms per kind and stream over time from ``--journal``, ``/metrics``
the monitors' counters in the Prometheus text format (``prometheus-client``).

What the view trusts, and what it refuses (issue 20): it shows whatever the peers on its
monitor and frame endpoints send (bounded, checked, never executed), and anyone who can
open its HTTP port may read the line: there is no login, and nothing can be changed
through it. It answers only requests whose ``Host`` is a name it serves (the loopback
names, the bound address, ``--allow-host`` names), so a web page cannot reach it through
DNS rebinding; it accepts a WebSocket only from a page of its own origin; every response
carries a Content-Security-Policy that allows nothing outside the view, refuses framing,
and names no server version. It holds at most `MAX_CONNECTIONS` connections and closes
one that has no request in progress after `IDLE_S` (slow headers, idle keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lhtstream.base.errors import LhtstreamError
from lhtstream.io import protocol
from lhtstream.io.journal import Journal, JournalError
from lhtstream.kernels.features import measure_video
from lhtstream.model.detector import ALARM_KINDS
from lhtstream.model.normality import NormalityModel

PICTURE_HZ = 25
"""Heat-map pictures sent per second and stream (the newest frame each time)."""
STATE_EVERY = 6
"""Picture ticks per state update (25 / 6: ~4 updates/s of tables, strips and paths)."""
EVIDENCE_WINDOW_S = 10.0
"""Seconds of per-kind evidence the strips show."""
PATH_FRAMES = 200
"""Consecutive frames (20 scan cycles at 1 kHz) measured for one drawn spot path."""
PATH_EVERY_S = 1.0
"""Seconds between two such bursts: the view decodes ~17 % of the frames for paths."""
STALE_S = 3.0
"""A monitor (or stream) without a status for this long is shown as silent / down."""
MAX_STREAMS = 256
"""Streams the view tracks; more are counted (``streams_ignored``) but not shown."""
MAX_EVENTS = 2_000
"""Alarms and verdicts kept for pages that (re)connect; each page keeps its own log."""
MAX_PAGES = 32
"""Simultaneous page connections; more are refused with 503."""
PAGE_SEND_BUFFER = 32 * 1024
"""Kernel send buffer per page (bytes; the kernel doubles it): ~2 s of a one-stream page's
traffic, ample for a 100 ms round trip at that rate. A page that stops reading is skipped
(pictures dropped for it) once this, its own receive buffer and aiohttp's are full."""
FRAME_RCVHWM = 2_000
"""Frames queued for the view before ZeroMQ drops for it (2 s at 1 kHz): a view that
stalls loses its own frames, the publisher never waits for it."""
VIEW_NICENESS = 10
"""The view runs at this CPU niceness, so the scheduler prefers the monitor over it."""
COMPLAIN_EVERY_S = 5.0
"""A bad message from a monitor is logged at most this often (the rest are counted)."""
RECEIVE_PERIOD_S = 0.01
"""The receive thread wakes this often and takes every message queued meanwhile."""
MAX_CONNECTIONS = 64
"""Simultaneous TCP connections (pages, scrapes, API calls). More are answered 503 and
closed at once, so connections held open cannot use up the view's file descriptors."""
IDLE_S = 5.0
"""A connection with no request in progress for this long is closed: one that sends its
headers slowly (slowloris), never sends them, or idles in keep-alive. A page's WebSocket
is a request in progress; its heartbeat (`HEARTBEAT_S`) drops a page that stops answering."""
HEARTBEAT_S = 10.0
"""WebSocket ping period; a page that does not answer within half of it is closed."""
LATENCY_CEILING_US = 3.6e9
"""A latency outside 0..1 h (us) is no measurement (a forged or broken ``t_ns`` gives
-9.2e15): shown and exported as missing."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
"""Host names the view always answers to."""
_WILDCARD = ("", "0.0.0.0", "::")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_CSP = ("default-src 'self'; connect-src 'self'{ws}; img-src 'self' data: blob:; "
        # Plotly.js sets inline styles on the elements it draws
        "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")
_DRAIN = 5_000
_PICTURE_MAGIC = 1
_STATIC = "view_static"


class ViewError(LhtstreamError):
    """The view cannot start: bad option, unreadable model or journal, port in use."""


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} view: {message}", file=sys.stderr, flush=True)


def _finite(value: Any, digits: int = 3) -> float | None:
    """A JSON-safe rounded number, or None for missing/NaN/inf/non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _text(value: Any, limit: int = 200) -> str | None:
    """A field shown on the page: strings cut to ``limit`` characters, others None."""
    return value[:limit] if isinstance(value, str) else None


def _kind(value: Any) -> str:
    """An alarm kind as the view keeps it: one it knows, else ``other`` (so what a peer
    sends cannot grow the view's per-stream tables)."""
    return value if value in ALARM_KINDS else "other"


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


# ---------------------------------------------------------------- the model's normal path


class NormalPaths:
    """The spot path the model learned per (type, obstacle state): the mean position
    relative to the running centre in each phase bin (px), a closed curve."""

    def __init__(self, model: NormalityModel) -> None:
        self._curves: dict[tuple[int, int], np.ndarray] = {}
        for slot, type_id in enumerate(model.types.tolist()):
            for obstacle in range(model.mean.shape[1]):
                if not model.known[slot, obstacle]:
                    continue
                valid = model.valid[slot, obstacle].astype(bool)
                if valid.sum() < 3:
                    continue
                xy = model.mean[slot, obstacle, :, 0:2].copy()
                xy[~valid] = np.nan
                self._curves[(int(type_id), obstacle)] = xy

    def placed(self, type_id: int, obstacle: int, xs: np.ndarray,
               ys: np.ndarray) -> dict[str, list] | None:
        """The normal path of ``type_id`` drawn where the measured ``xs, ys`` are.

        The model knows positions relative to the video's running centre, which the
        monitor does not publish; over whole scan cycles the measured positions average
        to that centre plus the curve's own mean, which places the curve.
        """
        curve = self._curves.get((int(type_id), int(obstacle)))
        ok = np.isfinite(xs) & np.isfinite(ys)
        if curve is None or ok.sum() < 20:
            return None
        finite = np.isfinite(curve).all(axis=1)
        cx = float(xs[ok].mean() - curve[finite, 0].mean())
        cy = float(ys[ok].mean() - curve[finite, 1].mean())
        closed = np.vstack([curve, curve[:1]])
        return {"x": _rounded(closed[:, 0] + cx), "y": _rounded(closed[:, 1] + cy)}


def _rounded(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 2) if math.isfinite(v) else None for v in values]


# ---------------------------------------------------------------- per-stream state


class PathBurst:
    """Collects ``PATH_FRAMES`` consecutive frames of one stream every ``PATH_EVERY_S``."""

    def __init__(self) -> None:
        self.buffer: np.ndarray | None = None
        self.obstacles = np.zeros(PATH_FRAMES, dtype=np.uint8)
        self.n = 0
        self.key: tuple | None = None  # (video, type, rows, cols): a change restarts
        self.next_seq = -1
        self.not_before = 0.0

    def offer(self, header: dict[str, Any], payload: bytes, now: float) -> np.ndarray | None:
        """Take one frame; returns the finished (frames, rows, cols) block, else None."""
        if self.n == 0 and now < self.not_before:
            return None
        rows, cols = header["shape"]
        key = (header["video"], header["type"], rows, cols)
        if self.n and (key != self.key or header["seq"] != self.next_seq):
            self.n = 0  # a gap or a new video: start the burst again
        if self.n == 0:
            self.key = key
            if self.buffer is None or self.buffer.shape[1:] != (rows, cols):
                self.buffer = np.zeros((PATH_FRAMES, rows, cols), dtype=np.uint16)
        self.buffer[self.n].flat[:] = np.frombuffer(payload, dtype="<u2")
        self.obstacles[self.n] = header["obstacle"]
        self.n += 1
        self.next_seq = header["seq"] + 1
        if self.n < PATH_FRAMES:
            return None
        self.n = 0
        self.not_before = now + PATH_EVERY_S
        return self.buffer


class StreamView:
    """What the view knows of one stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.monitor: str | None = None
        self.status: dict[str, Any] = {}
        self.status_at = -math.inf
        self.active: set[str] = set()
        self.alarm_at = -math.inf  # when the last alarm message of this stream came
        self.evidence: deque[tuple[float, dict[str, float]]] = deque(maxlen=1_000)
        self.alarms_raised: dict[str, int] = {}
        self.picture: tuple[dict[str, Any], bytes] | None = None
        self.picture_id = 0
        self.path: dict[str, Any] | None = None
        self.burst = PathBurst()


class ViewState:
    """Everything the page shows, fed by the receive thread; read under ``lock``."""

    def __init__(self, monitors: Sequence[str], normal: NormalPaths | None = None,
                 model_path: str | None = None) -> None:
        self.lock = threading.Lock()
        self.normal = normal
        self.model_path = model_path
        self.monitors: dict[str, dict[str, Any]] = {
            ep: {"status": None, "at": -math.inf} for ep in monitors}
        self.streams: dict[str, StreamView] = {}
        self._by_topic: dict[bytes, StreamView] = {}  # frame topic -> its stream (cache)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.event_id = 0
        self.malformed = 0  # messages the view itself rejected
        self.streams_ignored = 0
        self.started = time.monotonic()
        self.run = f"{time.time_ns():x}"  # lets a page tell a restarted view from a reconnect

    # ---- fed by the receive thread (caller holds the lock)

    def stream(self, name: str) -> StreamView | None:
        sv = self.streams.get(name)
        if sv is None:
            if len(self.streams) >= MAX_STREAMS:
                self.streams_ignored += 1
                return None
            sv = self.streams[name] = StreamView(name)
        return sv

    def wants(self, topic: bytes, newest: bool, now: float) -> bool:
        """Whether a frame on ``topic`` is worth decoding: the newest of its stream in this
        batch (the picture), or one its stream's path burst is collecting."""
        if newest:
            return True
        sv = self._by_topic.get(topic)
        return sv is None or sv.burst.n > 0 or now >= sv.burst.not_before

    def on_frame(self, topic: bytes, header: dict[str, Any], payload: bytes, now: float,
                 newest: bool = True) -> None:
        sv = self.stream(header["stream"])
        if sv is None:
            return
        if len(self._by_topic) < MAX_STREAMS:
            self._by_topic[topic] = sv
        if newest:
            sv.picture = (header, payload)
            sv.picture_id += 1
        block = sv.burst.offer(header, payload, now)
        if block is not None:
            self._measure_path(sv, header, block)

    def _measure_path(self, sv: StreamView, header: dict[str, Any], block: np.ndarray) -> None:
        rows = measure_video(block)
        xs, ys = rows[:, 0], rows[:, 1]
        obstacle = int(np.bincount(sv.burst.obstacles).argmax())
        same = sv.burst.obstacles == obstacle
        path: dict[str, Any] = {
            "x": _rounded(xs), "y": _rounded(ys), "video": header["video"],
            "type": header["type"], "frame": header["frame"], "obstacle": obstacle,
            "shape": list(header["shape"]), "normal": None,
        }
        if self.normal is not None:
            path["normal"] = self.normal.placed(header["type"], obstacle, xs[same], ys[same])
        sv.path = path

    def on_status(self, endpoint: str, header: dict[str, Any], now: float) -> None:
        entry = self.monitors.setdefault(endpoint, {"status": None, "at": -math.inf})
        stream = header.get("stream")
        if stream != "*":  # a status of one stream (a monitor that publishes them apart)
            if header.get("evicted") is True:  # the monitor stopped serving it (silent)
                gone = self.streams.pop(stream, None)
                self._by_topic = {t: v for t, v in self._by_topic.items() if v is not gone}
            elif isinstance(stream, str):
                self._stream_status(endpoint, stream, header, now)
            return
        entry["status"] = header
        entry["at"] = now
        streams = header.get("streams")
        if isinstance(streams, dict):
            for name, st in streams.items():
                if isinstance(name, str) and isinstance(st, dict):
                    self._stream_status(endpoint, name, st, now)

    def _stream_status(self, endpoint: str, name: str, st: dict[str, Any], now: float) -> None:
        sv = self.stream(name)
        if sv is None:
            return
        previous = sv.status_at
        sv.monitor = endpoint
        sv.status = st
        sv.status_at = now
        pipeline = st.get("pipeline") if isinstance(st.get("pipeline"), dict) else {}
        active = pipeline.get("alarms_active")
        if sv.alarm_at < previous and isinstance(active, list):
            # no alarm message since the last status: the status is the newer word
            sv.active = {_kind(a) for a in active[:len(ALARM_KINDS)]}
        if pipeline.get("mode") != "scoring":
            sv.active.clear()
        evidence = pipeline.get("evidence")
        if isinstance(evidence, dict):
            values = {k: v for k, v in ((k, _finite(evidence.get(k))) for k in ALARM_KINDS)
                      if v is not None}
            sv.evidence.append((now, values))

    def on_alarm(self, header: dict[str, Any], now: float) -> None:
        sv = self.stream(header["stream"])
        if sv is None:
            return
        kind = _kind(header["kind"])
        sv.alarm_at = now
        if header["state"] == "raise":
            sv.active.add(kind)
            sv.alarms_raised[kind] = sv.alarms_raised.get(kind, 0) + 1
        else:
            sv.active.discard(kind)
        self._event({
            "topic": "alarm", "stream": sv.name, "video": _text(header["video"]),
            "type": header["type"], "frame": header["frame"], "kind": kind,
            "state": header["state"], "score": _finite(header["score"]),
            "threshold": _finite(header["threshold"]), "seq": header["seq"],
        })

    def on_verdict(self, header: dict[str, Any], now: float) -> None:
        sv = self.stream(header["stream"])
        if sv is None:
            return
        sv.active.clear()
        kinds = header.get("kinds")
        self._event({
            "topic": "verdict", "stream": sv.name, "video": _text(header["video"]),
            "type": header["type"], "frames": header["frames"],
            "score": _finite(header["score"]), "anomalous": header["anomalous"],
            "alarms": header["alarms"],
            "kinds": [_text(k, 40) for k in kinds[:len(ALARM_KINDS) + 1]]
                     if isinstance(kinds, list) else [],
        })

    def _event(self, event: dict[str, Any]) -> None:
        self.event_id += 1
        event["id"] = self.event_id
        event["time"] = time.strftime("%H:%M:%S")
        self.events.append(event)

    # ---- read by the server (caller holds the lock)

    def stream_state(self, sv: StreamView, now: float) -> tuple[str, str]:
        """(state, word): the colour class and the word the overview shows."""
        mon = self.monitors.get(sv.monitor or "")
        if now - sv.status_at > STALE_S or (mon and now - mon["at"] > STALE_S):
            return "stale", "no status"
        if sv.active:
            return "alarm", "ALARM " + ", ".join(sorted(sv.active))
        mode = (sv.status.get("pipeline") or {}).get("mode")
        if mode == "calibrating":
            return "calibrating", "calibrating"
        if mode == "scoring":
            return "normal", "normal"
        return "idle", "idle"

    def snapshot(self, now: float) -> dict[str, Any]:
        """The JSON-ready state of every monitor and stream (no events, no pictures)."""
        monitors = []
        for ep, entry in self.monitors.items():
            st = entry["status"] or {}
            monitors.append({
                "endpoint": ep, "up": now - entry["at"] <= STALE_S,
                "age_s": _finite(now - entry["at"], 1) if entry["status"] else None,
                "model": _text(st.get("model")), "uptime_s": _finite(st.get("uptime_s"), 1),
                "frames": _int(st.get("frames")), "dropped": _int(st.get("dropped")),
                "malformed": _int(st.get("malformed")), "errors": _int(st.get("errors")),
                "latency_us": _latency(st.get("latency_us")),
            })
        streams = []
        for sv in sorted(self.streams.values(), key=lambda s: s.name):
            st = sv.status
            state, word = self.stream_state(sv, now)
            horizon = now - EVIDENCE_WINDOW_S
            evidence = [(round(t - now, 2), v) for t, v in sv.evidence if t >= horizon]
            streams.append({
                "name": sv.name, "monitor": sv.monitor, "state": state, "word": word,
                "video": _text(st.get("video")), "type": _int(st.get("type")),
                "frame": _int(st.get("frame")), "frames": _int(st.get("frames")),
                "dropped": _int(st.get("dropped")), "malformed": _int(st.get("malformed")),
                "latency_us": _latency(st.get("latency_us")), "model": _text(st.get("model")),
                "evidence": {"t": [t for t, _ in evidence],
                             "kinds": {k: [v.get(k) for _, v in evidence] for k in ALARM_KINDS}},
                "path": sv.path,
            })
        return {
            "monitors": monitors, "streams": streams, "kinds": list(ALARM_KINDS),
            # file names only: a response names no path on the view's host
            "run": self.run, "model": Path(self.model_path).name if self.model_path else None,
            "streams_ignored": self.streams_ignored,
            "malformed": self.malformed,
        }


def _latency(value: Any) -> dict[str, float | None]:
    """A status's latency percentiles (us); implausible ones (`LATENCY_CEILING_US`) None."""
    value = value if isinstance(value, dict) else {}
    out = {k: _finite(value.get(k), 1) for k in ("p50", "p99", "p999", "max")}
    return {k: v if v is not None and 0.0 <= v <= LATENCY_CEILING_US else None
            for k, v in out.items()}


# ---------------------------------------------------------------- receiving


class Receiver(threading.Thread):
    """Owns every ZeroMQ socket: one SUB per monitor (status/alarm/verdict) and one for
    the frames of every ``--frames`` endpoint; feeds ``ViewState``."""

    def __init__(self, state: ViewState, monitors: Sequence[str],
                 frames: Sequence[str]) -> None:
        super().__init__(name="view-receive", daemon=True)
        self.state = state
        self.stop_event = threading.Event()
        self.ctx = zmq.Context()
        self.monitor_socks: dict[Any, str] = {}
        self.frame_sock = None
        self._complained_at = -math.inf
        self._complaints = 0
        try:
            for ep in monitors:
                sock = self.ctx.socket(zmq.SUB)
                protocol.configure_subscriber(sock, ["status", "alarm", "verdict"])
                sock.connect(ep)
                self.monitor_socks[sock] = ep
            if frames:
                sock = self.ctx.socket(zmq.SUB)
                protocol.configure_subscriber(sock, ["frame"])
                sock.setsockopt(zmq.RCVHWM, FRAME_RCVHWM)
                for ep in frames:
                    sock.connect(ep)
                self.frame_sock = sock
        except zmq.ZMQError as exc:
            self.close()
            raise ViewError(f"cannot connect {exc}") from None

    def run(self) -> None:
        """Drain every socket, then sleep until the next ``RECEIVE_PERIOD_S`` tick.

        Waking once per frame (1000+ times a second) would compete with the monitor for
        the CPU on every frame; waking 100 times a second and taking what queued meanwhile
        costs a fraction of that, and a page does not see 10 ms.
        """
        period = RECEIVE_PERIOD_S
        next_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                for sock, endpoint in self.monitor_socks.items():
                    self._drain_monitor(sock, endpoint)
                if self.frame_sock is not None:
                    self._drain_frames(self.frame_sock)
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
                else:
                    next_at = time.monotonic()  # fell behind: no catching up in a burst
        finally:
            self.close()

    def _messages(self, sock: Any, endpoint: str) -> Iterable[Any]:
        """The valid messages queued on ``sock`` (at most `_DRAIN`); bad ones are counted."""
        for _ in range(_DRAIN):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield protocol.decode(parts)
            except protocol.ProtocolError as exc:
                self.state.malformed += 1
                self._complain(f"malformed message from {endpoint} ignored: {exc}")

    def _drain_frames(self, sock: Any) -> None:
        """Take every queued frame, decode only the ones used: each stream's newest (its
        picture) and those a path burst collects. The stream is in the topic
        (``frame/<stream>/``), so the others cost a receive and nothing more."""
        batch = []
        for _ in range(_DRAIN):
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        if not batch:
            return
        newest = {parts[0]: i for i, parts in enumerate(batch)}
        state = self.state
        now = time.monotonic()
        with state.lock:
            for i, parts in enumerate(batch):
                topic = parts[0]
                last = newest[topic] == i
                if not state.wants(topic, last, now):
                    continue
                try:
                    message = protocol.decode(parts)
                except protocol.ProtocolError as exc:
                    state.malformed += 1
                    self._complain(f"malformed frame ignored: {exc}")
                    continue
                if message.topic == "frame":
                    state.on_frame(topic, message.header, message.payload, now, last)

    def _drain_monitor(self, sock: Any, endpoint: str) -> None:
        state = self.state
        handlers = {"status": lambda h, now: state.on_status(endpoint, h, now),
                    "alarm": state.on_alarm, "verdict": state.on_verdict}
        for message in self._messages(sock, endpoint):
            handler = handlers.get(message.topic)
            if handler is None:
                continue
            with state.lock:
                try:
                    handler(message.header, time.monotonic())
                except Exception as exc:  # a field we did not expect must not stop the view
                    state.malformed += 1
                    self._complain(f"{message.topic} message from {endpoint} not understood: "
                                   f"{type(exc).__name__}: {exc}")

    def _complain(self, message: str) -> None:
        """Log a bad message at most every `COMPLAIN_EVERY_S`, with the count since."""
        now = time.monotonic()
        self._complaints += 1
        if now - self._complained_at >= COMPLAIN_EVERY_S:
            more = f" ({self._complaints - 1} more since the last report)" \
                if self._complaints > 1 else ""
            _log(message + more)
            self._complained_at = now
            self._complaints = 0

    def close(self) -> None:
        for sock in [*self.monitor_socks, self.frame_sock]:
            if sock is not None:
                sock.close(0)
        self.ctx.term()


# ---------------------------------------------------------------- /metrics


class MonitorCollector:
    """Prometheus metrics from the monitors' own counters (their latest status) and the
    alarms the view saw; read at scrape time."""

    def __init__(self, state: ViewState) -> None:
        self.state = state

    def collect(self) -> Iterable[Any]:
        state = self.state
        now = time.monotonic()
        frames = CounterMetricFamily("lhtstream_frames", "Frames the monitor received.",
                                     labels=["stream"])
        lost = CounterMetricFamily("lhtstream_lost_frames",
                                   "Frames missing from the stream's seq (lost in transport).",
                                   labels=["stream"])
        malformed = CounterMetricFamily(
            "lhtstream_malformed_messages",
            "Messages the monitor rejected; stream empty for those of no known stream.",
            labels=["stream"])
        alarms = CounterMetricFamily("lhtstream_alarms",
                                     "Alarms raised, seen by this view since it started.",
                                     labels=["stream", "kind"])
        latency = GaugeMetricFamily(
            "lhtstream_handling_latency_seconds",
            "Per-frame handling latency (done minus the frame's t_ns) over the monitor's "
            "last status interval.", labels=["stream", "quantile"])
        mode = GaugeMetricFamily("lhtstream_model_state",
                                 "1 for the stream's current model state, else 0.",
                                 labels=["stream", "state"])
        up = GaugeMetricFamily("lhtstream_monitor_up",
                               f"1 when the monitor sent a status in the last {STALE_S:g} s.",
                               labels=["monitor"])
        with state.lock:
            for ep, entry in state.monitors.items():
                up.add_metric([ep], 1.0 if now - entry["at"] <= STALE_S else 0.0)
                st = entry["status"] or {}
                total = _int(st.get("malformed"))
                if total is not None:
                    per_stream = sum(_int(s.status.get("malformed")) or 0
                                     for s in state.streams.values() if s.monitor == ep)
                    malformed.add_metric([""], max(total - per_stream, 0))
            for sv in state.streams.values():
                st = sv.status
                for family, key in ((frames, "frames"), (lost, "dropped"),
                                    (malformed, "malformed")):
                    value = _int(st.get(key))
                    if value is not None:
                        family.add_metric([sv.name], value)
                for kind, n in sv.alarms_raised.items():
                    alarms.add_metric([sv.name, kind], n)
                lat = _latency(st.get("latency_us"))
                for q, key in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p999"),
                               ("1", "max")):
                    if lat[key] is not None:
                        latency.add_metric([sv.name, q], lat[key] / 1e6)
                if sv.status:
                    current = (sv.status.get("pipeline") or {}).get("mode")
                    for name in ("idle", "calibrating", "scoring"):
                        mode.add_metric([sv.name, name], 1.0 if current == name else 0.0)
        return [frames, lost, malformed, alarms, latency, mode, up]


# ---------------------------------------------------------------- journal history


def journal_history(path: str) -> dict[str, Any]:
    """Alarms raised per kind and stream over time, and verdicts, from a journal."""
    with Journal(path, writer=False) as journal:
        bucket_s, rows = journal.raise_counts()
        verdicts = journal.verdict_counts(bucket_s)
    return {
        "journal": Path(path).name, "bucket_s": bucket_s,
        "alarms": [{"t": t, "stream": s, "kind": k, "n": n} for t, s, k, n in rows],
        "verdicts": [{"t": t, "stream": s, "anomalous": a, "n": n} for t, s, a, n in verdicts],
    }


# ---------------------------------------------------------------- the web server


def _plotly_js() -> Path:
    """plotly.js as shipped inside the installed ``plotly`` Python package (no CDN)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise ViewError("the plotly package is missing: pip install plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ViewError(f"plotly.js not found in the plotly package ({path})")
    return path


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> frozenset[str]:
    """The ``Host`` names the view answers to: the loopback names, the address it is bound
    to (unless a wildcard) and ``extra`` (``--allow-host``: names and addresses by which the
    plant's browsers reach it). IPv6 addresses in brackets, as in a ``Host`` header."""
    names = set(LOOPBACK_NAMES)
    for raw in ([] if bind in _WILDCARD else [bind]) + list(extra):
        name = raw.strip().lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if not _NAME.fullmatch(name):
                raise ViewError(f"{raw!r} is not a host name or an IP address (no port, "
                                "no scheme)") from None
        else:
            name = f"[{address.compressed}]" if address.version == 6 else address.compressed
        names.add(name)
    return frozenset(names)


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header (port dropped, lower case), None if malformed."""
    match = _HOST.fullmatch((header or "").lower())
    return match.group(1).rstrip(".") if match else None


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` is the page's own: http(s) and the same host:port."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class _Refuse(asyncio.Protocol):
    """A connection over `MAX_CONNECTIONS`: answered 503 and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.close()


class Connections:
    """The view's TCP protocol factory, around aiohttp's: at most `MAX_CONNECTIONS`, and a
    connection whose first request has not come in `IDLE_S` is closed. (Between
    requests, aiohttp's keep-alive timeout, set to `IDLE_S` as well, closes it.)"""

    def __init__(self, server: Any) -> None:
        self.server = server  # aiohttp's web.Server: a protocol factory
        self.opened: dict[Any, float] = {}  # connection -> when it opened, until a request
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        now = time.monotonic()
        live = set(self.server.connections)
        # asyncio accepts a burst before any of it is connected: count those too
        starting = sum(1 for h, at in self.opened.items() if h not in live and now - at < 1.0)
        if len(live) + starting >= MAX_CONNECTIONS:
            self.refused += 1
            return _Refuse()
        handler = self.server()
        self.opened[handler] = time.monotonic()
        return handler

    def started(self, handler: Any) -> None:
        """A request came in on ``handler``'s connection."""
        self.opened.pop(handler, None)

    async def sweep(self) -> None:
        """Close connections still without a request after `IDLE_S` (runs until cancelled)."""
        while True:
            await asyncio.sleep(IDLE_S / 5)
            now = time.monotonic()
            live = set(self.server.connections)
            for handler, at in list(self.opened.items()):
                if handler not in live or now - at > IDLE_S:
                    del self.opened[handler]
                    if handler in live:
                        handler.force_close()


class Page:
    """One connected browser page and what it has been sent."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.busy = False  # a send to it is still in progress: skip pictures meanwhile
        self.event_id = 0
        self.picture_ids: dict[str, int] = {}
        self.pictures_dropped = 0


def _picture_message(name: str, header: dict[str, Any], payload: bytes) -> bytes:
    """Binary picture: magic u8, name length u8, name, pad to even, frame u32, rows u16,
    cols u16, then the ``<u2`` pixels (little-endian, row-major)."""
    raw = name.encode()[:255]
    head = struct.pack("<BB", _PICTURE_MAGIC, len(raw)) + raw
    if len(head) % 2:
        head += b"\0"
    rows, cols = header["shape"]
    return head + struct.pack("<IHH", header["frame"] & 0xFFFFFFFF, rows, cols) + payload


class ViewServer:
    """aiohttp application: the page, its WebSocket, JSON endpoints and /metrics."""

    def __init__(self, state: ViewState, journal: str | None = None,
                 hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)) -> None:
        self.state = state
        self.journal = journal
        self.hosts = hosts
        self.connections: Connections | None = None  # set by `serve`
        self.pages: set[Page] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MonitorCollector(state))
        self.static = Path(__file__).with_name(_STATIC)
        self.plotly_js = _plotly_js()  # at start: a missing one is a one-line error
        self.app = web.Application(middlewares=[self._check_host])
        self.app.on_response_prepare.append(self._secure)
        self.app.add_routes([
            web.get("/", self.index),
            web.get("/ws", self.websocket),
            web.get("/metrics", self.metrics),
            web.get("/api/state", self.api_state),
            web.get("/api/history", self.api_history),
            web.get("/static/plotly.min.js", self.plotly),
            web.get("/static/{name}", self.static_file),
        ])
        self.app.on_startup.append(self._start_ticker)
        self.app.on_shutdown.append(self._close_pages)

    # ---- every request and response

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Answer only the names this view serves (a page reached through DNS rebinding
        carries its own site's name in ``Host``)."""
        if self.connections is not None:
            self.connections.started(request.protocol)
        if host_name(request.headers.get("Host")) not in self.hosts:
            raise web.HTTPMisdirectedRequest(
                text="421: this view does not serve that host name (lhtstream view "
                "--allow-host NAME adds one)")
        return await handler(request)

    async def _secure(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers of every response: no server version, nothing loaded from elsewhere,
        never framed, no referrer sent."""
        response.headers["Server"] = "lhtstream"
        response.headers.update(_SECURITY_HEADERS)
        host = request.headers.get("Host")
        ws = f" ws://{host} wss://{host}" if host and host_name(host) in self.hosts else ""
        response.headers["Content-Security-Policy"] = _CSP.format(ws=ws)

    # ---- HTTP

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=(self.static / "index.html").read_bytes(),
                            content_type="text/html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = Path(name).suffix
        if "/" in name or name.startswith(".") or suffix not in types:
            raise web.HTTPNotFound()
        item = self.static / name
        if not item.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=item.read_bytes(), content_type=types[suffix])

    async def plotly(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.plotly_js, headers={"Cache-Control": "max-age=86400"})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_state(self, request: web.Request) -> web.StreamResponse:
        with self.state.lock:
            snap = self.state.snapshot(time.monotonic())
            snap["events"] = list(self.state.events)
        snap["pages"] = [{"pictures_dropped": p.pictures_dropped, "busy": p.busy}
                         for p in self.pages]
        return web.json_response(snap)

    async def api_history(self, request: web.Request) -> web.StreamResponse:
        if self.journal is None:
            return web.json_response({"journal": None, "error": "the view was started "
                                      "without --journal FILE"})
        try:
            history = await asyncio.get_running_loop().run_in_executor(
                None, journal_history, self.journal)
        except JournalError as exc:
            name = Path(self.journal).name  # no path on the view's host in a response
            return web.json_response({"journal": name,
                                      "error": str(exc).replace(self.journal, name)})
        return web.json_response(history)

    # ---- WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not same_origin(origin, request.host):
            # a page of another site, in the operator's browser, must not read the line
            raise web.HTTPForbidden(text="403: a WebSocket from a page of another origin")
        if len(self.pages) >= MAX_PAGES:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_PAGES} pages at once")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=4096)
        await ws.prepare(request)
        raw = request.transport.get_extra_info("socket") if request.transport else None
        if raw is not None:
            # bounds what a page that stopped reading holds (and how soon it shows as busy)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAGE_SEND_BUFFER)
        page = Page(ws)
        self.pages.add(page)
        try:
            async for msg in ws:  # the page sends nothing we need; read to see it close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.pages.discard(page)
        return ws

    async def _start_ticker(self, app: web.Application) -> None:
        app["ticker"] = asyncio.create_task(self._ticker())

    async def _close_pages(self, app: web.Application) -> None:
        app["ticker"].cancel()
        for page in list(self.pages):
            await page.ws.close()

    async def _ticker(self) -> None:
        period = 1.0 / PICTURE_HZ
        tick = 0
        next_at = time.monotonic()
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > 1.0:
                next_at = time.monotonic()  # suspended: do not burst
            tick += 1
            if not self.pages:
                continue
            with_state = tick % STATE_EVERY == 0
            pictures, state_json, events = self._collect(with_state)
            for page in list(self.pages):
                fresh = [(n, i, b) for n, i, b in pictures if page.picture_ids.get(n) != i]
                if page.busy:
                    page.pictures_dropped += len(fresh)
                    continue
                new_events = [e for e in events if e["id"] > page.event_id]
                if not fresh and state_json is None:
                    continue
                page.busy = True
                asyncio.create_task(self._send(page, fresh, state_json, new_events))

    def _collect(self, with_state: bool) -> tuple[list, str | None, list]:
        state = self.state
        pictures = []
        with state.lock:
            for sv in state.streams.values():
                if sv.picture is not None:
                    pictures.append((sv.name, sv.picture_id, sv.picture))
            snap = state.snapshot(time.monotonic()) if with_state else None
            events = list(state.events) if with_state else []
        built = [(n, i, _picture_message(n, *p)) for n, i, p in pictures]
        return built, (json.dumps(snap, allow_nan=False) if snap else None), events

    async def _send(self, page: Page, pictures: list, state_json: str | None,
                    events: list) -> None:
        try:
            for name, pid, body in pictures:
                await page.ws.send_bytes(body)
                page.picture_ids[name] = pid
            if state_json is not None:
                extra = json.dumps({"events": events, "pictures_dropped": page.pictures_dropped})
                await page.ws.send_str('{"type":"state","state":' + state_json + "," + extra[1:])
                if events:
                    page.event_id = events[-1]["id"]
        except (ConnectionError, RuntimeError):
            pass  # the page went away; websocket() removes it
        finally:
            page.busy = False


# ---------------------------------------------------------------- running it


def serve(monitors: Sequence[str], frames: Sequence[str], host: str, port: int,
          allow_hosts: Sequence[str] = (), model_path: str | None = None,
          journal: str | None = None) -> None:
    """Serve the view until SIGINT/SIGTERM; `ViewError` if it cannot start.

    ``monitors``: publish endpoints to subscribe to; ``frames``: frame endpoints (pictures
    and paths; may be empty); ``allow_hosts``: names besides the loopback ones and
    ``host`` that browsers may reach it by (`allowed_hosts`); ``model_path``: draws the
    model's normal path; ``journal``: the history tab's source.
    """
    normal = None
    if model_path:
        normal = NormalPaths(NormalityModel.load(model_path))
    if journal and not Path(journal).exists():
        _log(f"journal {journal} does not exist yet: the history shows it once the "
             "monitor has created it")
    # Every frame wakes the view's ZeroMQ thread at the moment it wakes the monitor's; on
    # a busy host the view must lose that race (measured: with both at nice 0 on a loaded
    # 2-core VM the monitor's p50 rose several-fold while a view was attached).
    with contextlib.suppress(OSError):
        os.nice(VIEW_NICENESS)  # before any thread starts: they all inherit it
    hosts = allowed_hosts(host, allow_hosts)
    state = ViewState(monitors, normal, model_path)
    server = ViewServer(state, journal, hosts)
    receiver = Receiver(state, monitors, frames)
    receiver.start()
    try:
        asyncio.run(_serve(server, host, port, monitors, frames))
    finally:
        receiver.stop_event.set()
        receiver.join(5.0)


async def _serve(server: ViewServer, host: str, port: int, monitors: Sequence[str],
                 frames: Sequence[str]) -> None:
    runner = web.AppRunner(server.app, handle_signals=False, access_log=None,
                           keepalive_timeout=IDLE_S)
    await runner.setup()
    server.connections = connections = Connections(runner.server)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(connections, host or None, port,
                                            reuse_address=True)
    except OSError as exc:
        await runner.cleanup()
        raise ViewError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sweeper = asyncio.create_task(connections.sweep())
    bound = listener.sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    _log(f"serving http://{shown}:{bound}/ (metrics at /metrics); monitors "
         f"{', '.join(monitors)}; frames {', '.join(frames) or 'none (no pictures)'}")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        _log("stopping")
        sweeper.cancel()
        listener.close()
        await runner.cleanup()
