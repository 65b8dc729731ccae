"""What the live view knows (`ViewState`), fed by its receive thread (`Receiver`, which
owns every ZeroMQ socket), and what is read from it: the Prometheus metrics
(`MonitorCollector`) and the journal's history. The server is `lhtstream.service.view`.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lhtstream.base.errors import LhtstreamError
from lhtstream.io import protocol
from lhtstream.io.events import Alarm, Event
from lhtstream.io.journal import Journal
from lhtstream.kernels.features import measure_video
from lhtstream.model.detector import ALARM_KINDS
from lhtstream.model.normality import NormalityModel

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
FRAME_RCVHWM = 2_000
"""Frames queued for the view before ZeroMQ drops for it (2 s at 1 kHz): a view that
stalls loses its own frames, the publisher never waits for it."""
COMPLAIN_EVERY_S = 5.0
"""A bad message from a monitor is logged at most this often (the rest are counted)."""
RECEIVE_PERIOD_S = 0.01
"""The receive thread wakes this often and takes every message queued meanwhile."""
LATENCY_CEILING_US = 3.6e9
"""A latency outside 0..1 h (us) is no measurement (a forged or broken ``t_ns`` gives
-9.2e15): shown and exported as missing."""
_DRAIN = 5_000


class ViewError(LhtstreamError):
    """The view cannot start: bad option, unreadable model or journal, port in use."""


def log(message: str) -> None:
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

    def on_event(self, event: Event, now: float) -> None:
        """An alarm or a verdict of a monitor (`protocol.from_wire`)."""
        sv = self.stream(event.stream)
        if sv is None:
            return
        if isinstance(event, Alarm):
            kind = _kind(event.kind)
            sv.alarm_at = now
            if event.state == "raise":
                sv.active.add(kind)
                sv.alarms_raised[kind] = sv.alarms_raised.get(kind, 0) + 1
            else:
                sv.active.discard(kind)
            self._event({
                "topic": "alarm", "stream": sv.name, "video": _text(event.video),
                "type": event.type, "frame": event.frame, "kind": kind,
                "state": event.state, "score": _finite(event.score),
                "threshold": _finite(event.threshold), "seq": event.seq,
            })
            return
        sv.active.clear()
        kinds = event.kinds
        self._event({
            "topic": "verdict", "stream": sv.name, "video": _text(event.video),
            "type": event.type, "frames": event.frames,
            "score": _finite(event.score), "anomalous": event.anomalous,
            "alarms": event.alarms,
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
        for message in self._messages(sock, endpoint):
            if message.topic not in ("status", "alarm", "verdict"):
                continue
            with state.lock:
                try:
                    if message.topic == "status":
                        state.on_status(endpoint, message.header, time.monotonic())
                    else:
                        state.on_event(protocol.from_wire(message), time.monotonic())
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
            log(message + more)
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
