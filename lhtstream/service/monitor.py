"""The monitor service: SUB frames -> per-stream pipeline -> journal -> PUB status/alarm/verdict.

One process serves any number of streams (the header's ``stream``). The loop:

1. poll the SUB socket with a timeout, so ``status`` goes out on time without frames;
2. on wake-up drain every queued message (``--rate max`` queues many per wake-up; at
   1 kHz there is usually one);
3. per frame: ``protocol.decode`` -> the stream's line (seq and video, `_on_frame`) ->
   the stream's `FrameBlock` -> ``StreamPipeline`` -> events; every alarm/verdict is
   mapped to the wire (``protocol.to_wire``), committed to the journal, then published.
   Frames of a stream that arrive queued behind each other are stepped in blocks
   (``process_block``, one compiled call over up to ``BLOCK_FRAMES``) as soon as the
   queue is empty; a frame with nothing behind it is a block of one, handled at once.

A plant splits its streams over monitors with ``streams`` (``--streams ws1,line2-*``):
the SUB socket subscribes only to those streams' topics, so ZeroMQ drops the others
before they reach Python (docs/operations.md). Every size is bounded: at most
``max_streams`` streams at once, a stream silent for ``idle_seconds`` is evicted, and
status goes out as one small message for the monitor plus one per stream.

Bad input never stops the loop: it is counted (``malformed``, or ``dropped`` for seq
gaps) and reported on stderr at most once per second per class of problem, and what one
message can make the monitor count, journal or forget is bounded (``MAX_SEQ_GAP``,
``RESTART_RUN``, the short-video budget, slots reclaimed from streams that never had a
workpiece: docs/operations.md, "Hostile or broken peers"). Per-frame handling latency
(done minus the frame's ``t_ns``) goes into a preallocated array; percentiles are
computed once per status interval, not per frame.

Modules: this one is the loop and the per-stream rules; `streams` holds what is kept per
stream, `latency` the latency rings, `connections` the frame connections' watch,
`oplog` the operator log, `launch` the start-up (model, warm-up, sockets: `serve`),
`startup` the early signal handler.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import zmq

from lhtstream.base.errors import LhtstreamError
from lhtstream.io import protocol
from lhtstream.io.events import Event, Verdict
from lhtstream.service.connections import FrameConnections
from lhtstream.service.latency import LatencyRecorder, percentile_summary
from lhtstream.service.oplog import RateLimitedLog, log
from lhtstream.service.pipeline import MIN_WORKPIECE_FRAMES
from lhtstream.service.streams import (
    COUNTED,
    FrameBlock,
    StreamState,
    TokenBucket,
    model_state,
)

__all__ = ["FrameBlock", "LatencyRecorder", "Monitor", "MonitorError", "RateLimitedLog",
           "StreamState", "log", "percentile_summary"]

DRAIN_BUDGET = 2_000
"""Messages handled per wake-up before the loop looks at the clock again (status, signals)."""
DEFAULT_MAX_STREAMS = 64
"""Streams one monitor serves at once (each holds a pipeline of ~1-2 MB); more are refused."""
DEFAULT_IDLE_SECONDS = 300.0
"""A stream with no message for this long is evicted (its video ends as partial)."""
_SWEEP_NS = 1_000_000_000
"""How often the loop looks for idle streams."""
_POLL_CAP_MS = 100
"""Longest poll: bounds the reaction time to SIGTERM (pyzmq retries polls on EINTR)."""
SPARE_PIPELINES = 4
"""Stream pipelines kept ready; refilled only while no frame arrives."""
_ACTIVE_NS = 20_000_000
"""A stream that delivered a message within this many ns counts as flowing."""
_STATUS_SLACK_NS = 3_000_000
"""How late a status may go out to avoid landing between a frame's arrival and its handling."""
MAX_SEQ_GAP = 10_000
"""Largest forward ``seq`` jump counted as lost frames (frames: 10 s at 1 kHz, the depth
of the SUB queue). A larger jump is no gap but a forged or restarted sequence: the frame
is rejected (``malformed``) and the stream stays where it was, unless ``RESTART_RUN``
consecutive seqs follow from there. So one message adds at most this to ``dropped``."""
RESTART_RUN = 100
"""Consecutive frames (each ``seq`` +1 from the last, one video and type) that a stream
must receive off its line (``seq`` backwards or beyond ``MAX_SEQ_GAP``, or another video
without a ``video start``) before the monitor follows them: a publisher that restarted
without its ``video start``, or whose ``video start`` was lost. Frames interleaved with
the real ones never make such a run (each real frame breaks it); a peer sending 100 of
its own in a row is followed (without CURVE, a trusted peer)."""
MAX_FRAME_AGE_NS = 60_000_000_000
"""A frame's ``t_ns`` older than this at receipt (60 s; the SUB queue holds 10 s at
1 kHz) is implausible: counted (``bad_time``) and replaced by the receipt time."""
CLOCK_SLACK_NS = 1_000_000
"""How far in the future (1 ms) a frame's ``t_ns`` may lie at receipt before it is
implausible: publisher and monitor share CLOCK_MONOTONIC on one host, so a frame is
always stamped before it is received."""
SHORT_VIDEO_BURST = 20
"""Videos the monitor journals at once before knowing whether they are workpieces (the
short-video budget, over all streams; a workpiece gives its share back)."""
SHORT_VIDEOS_PER_S = 2.0
"""Refill of the short-video budget (videos per second). A video started with the budget
empty is held back: its start and events are journaled and published once it reaches
MIN_WORKPIECE_FRAMES; if it ends before, they are dropped and counted (``short_videos``,
``suppressed``). So a flood of video starts or names adds at most this many journal
rows' worth of videos per second, and none per frame."""
MAX_HELD_EVENTS = 64
"""Events kept for a held-back video until it proves a workpiece; more are counted."""
class MonitorError(LhtstreamError):
    """The monitor cannot start: bad model, endpoint in use, journal locked."""


class Monitor:
    """The service loop over a SUB (``subscribe``) and a PUB (``publish``) socket.

    ``streams`` selects the streams this monitor serves (the SUB socket's subscriptions
    must match it: ``protocol.configure_subscriber(sub, ..., streams)``); at most
    ``max_streams`` are served at once, and one silent for ``idle_seconds`` is evicted.
    ``latency_log``: a preallocated float64 array that receives every frame's total
    latency (µs) in arrival order (``latency_logged`` counts them, also past its end);
    for benchmarks that need exact run-wide percentiles.
    """

    def __init__(
        self,
        *,
        make_pipeline: Callable[[str], Any],
        journal: Any,
        publish: Any,
        subscribe: Any,
        status_interval: float = 1.0,
        model_note: str = "model",
        streams: protocol.StreamSelection | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        latency_log: np.ndarray | None = None,
    ) -> None:
        self.make_pipeline = make_pipeline
        self.journal = journal
        self.pub = publish
        self.sub = subscribe
        self.status_interval = status_interval
        self.model_note = model_note
        self.selection = streams or protocol.StreamSelection(None)
        self.max_streams = max_streams
        self.idle_ns = int(idle_seconds * 1e9)
        self.latency_log = latency_log
        self.latency_logged = 0
        self.streams: dict[str, StreamState] = {}
        # Counts live per stream (`StreamState`, `COUNTED`); the monitor's are their sums
        # (`total`), plus what evicted streams had counted and undecodable messages.
        self._retired = dict.fromkeys(COUNTED, 0)
        self._undecodable = 0
        self.errors = 0
        self.alarms = 0
        self.verdicts = 0
        self.ignored = 0  # messages of streams this monitor does not serve
        self.refused = 0  # messages of new streams beyond max_streams
        self.refusal: str | None = None  # why the last new stream was refused
        self.evicted = 0  # streams evicted for silence
        self.reclaimed = 0  # streams evicted to make room for a new one (never established)
        self._short_budget = TokenBucket(SHORT_VIDEO_BURST, SHORT_VIDEOS_PER_S)
        self._churn = RateLimitedLog(10.0)
        self._t_recv = 0
        # the stream whose block holds frames (one at a time: a message of any other
        # topic steps it first, so no frame waits for another stream's) and its topic
        self._pending: StreamState | None = None
        self._pending_topic = b""
        self.started_ns = time.monotonic_ns()
        self.stop_requested = False
        self._bad_input = RateLimitedLog()
        self._gaps = RateLimitedLog()
        self._internal = RateLimitedLog()
        self._refusals = RateLimitedLog()
        self._journal_log = RateLimitedLog(10.0)
        # Pipelines made ahead of need: one costs 1-2 ms (a private model copy), and four
        # workstations joining at once made their first ~60 frames up to 13 ms late.
        self._spares = [make_pipeline("spare") for _ in range(min(SPARE_PIPELINES, max_streams))]
        self.connections: FrameConnections | None = None  # once `watch_connections`
        self._drained = True  # the last receive found the SUB queue empty
        # Streams whose per-stream status of this interval is still to be sent: one per
        # loop turn, so a status round never delays a frame by more than one message.
        self._status_due: deque[str] = deque()

    def total(self, count: str) -> int:
        """The monitor's ``count`` (one of `COUNTED`): its streams' and evicted streams'
        sum (``malformed`` also counts messages that named no stream it could decode)."""
        extra = self._undecodable if count == "malformed" else 0
        return self._retired[count] + extra + sum(getattr(st, count)
                                                  for st in self.streams.values())

    @property
    def frames(self) -> int:
        return self.total("frames")

    @property
    def dropped(self) -> int:
        return self.total("dropped")

    @property
    def malformed(self) -> int:
        return self.total("malformed")

    def watch_connections(self, endpoints: Iterable[str]) -> None:
        """Watch these frame endpoints (`FrameConnections`): failed handshakes named,
        an endpoint reconnected only when libzmq has given up on it."""
        self.connections = FrameConnections(self.sub, endpoints, self._gaps)

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        """Serve until ``stop_requested``; then publish a last status.

        Only the SUB socket is polled (one socket, no ``dict()``: ~1 µs less per wake-up
        than polling it with the socket-monitor PAIR, measured in-process); the
        socket-monitor events are read on a timer, as they only start a 0.5 s grace period.
        After a wake-up the first message is received (a blocking receive that cannot
        block) and ``ZMQ_EVENTS`` asked whether another is waiting: at 1 kHz there is
        none, and no ``zmq.Again`` is raised and caught per wake-up. If there is, this is a
        burst: the rest is received non-blocking until the one ``Again`` at its end (a
        ``ZMQ_EVENTS`` per message costs ~1 µs: pyzmq builds an enum). Parts are received
        as ``zmq.Frame``s, whose ``more`` says whether a part follows (pyzmq's
        ``getsockopt(RCVMORE)``, which ``recv_multipart`` calls per part, costs as much).
        A frame with more queued behind it goes into its stream's block (`FrameBlock`),
        stepped in one call when the queue is empty, the block full or the next frame
        does not continue it.
        """
        sub = self.sub
        recv = sub.recv
        events_of = sub.get
        option_events = int(zmq.EVENTS)
        pollin = int(zmq.POLLIN)  # ints: `int & PollEvent` builds an enum (~1.5 µs)
        noblock = int(zmq.NOBLOCK)
        monotonic_ns = time.monotonic_ns
        handle = self.handle
        interval_ns = int(self.status_interval * 1e9)
        next_status = monotonic_ns() + interval_ns
        next_events = 0
        next_sweep = monotonic_ns() + _SWEEP_NS
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poll = poller.poll
        last_frame_ns = 0
        while not self.stop_requested:
            now = monotonic_ns()
            due_ns = next_status
            if now - last_frame_ns < _ACTIVE_NS:
                # Frames are flowing: let the status wait for the next frame, so it is
                # built in the idle gap after one instead of delaying one.
                due_ns += _STATUS_SLACK_NS
            wait_ms = 0 if self._status_due else max(
                0, min(_POLL_CAP_MS, (due_ns - now) // 1_000_000))
            if poll(wait_ms):
                last_frame_ns = monotonic_ns()
                # Drain what is queued (bounded, so status and signals still get a turn).
                drained = False
                flags = 0  # the first receive cannot block: poll said a message is there
                for _ in range(DRAIN_BUDGET):
                    try:
                        part = recv(flags, copy=False)
                    except zmq.Again:  # the end of a burst
                        drained = True
                        break
                    self._t_recv = monotonic_ns()
                    topic = part.bytes
                    if self._pending is not None and topic != self._pending_topic:
                        self._flush_all()  # before this message of another stream or kind
                    if part.more:
                        header = recv(copy=False)
                        if header.more:
                            payload = recv(copy=False)
                            parts = [topic, header, payload]
                            if payload.more:
                                self._reject_long(parts)
                        else:
                            parts = [topic, header]
                    else:
                        parts = [topic]
                    if not flags:
                        if not events_of(option_events) & pollin:  # a single message
                            handle(parts, False)
                            drained = True
                            break
                        flags = noblock  # a burst: try for the next, one `Again` at its end
                    handle(parts, True)
                    if self.stop_requested:
                        break
                if self._pending is not None:
                    self._flush_all()
                self._drained = drained
            else:
                self._drained = True
                if len(self._spares) < min(SPARE_PIPELINES, self.max_streams):
                    self._spares.append(self.make_pipeline("spare"))  # idle: nothing to delay
            now = monotonic_ns()
            if self._status_due:
                self._publish_stream_status(self._status_due.popleft(), now)
                if now >= next_status - interval_ns // 2:
                    # half the interval gone (a flood makes turns long): the rest at once,
                    # so every stream's status comes at least once per interval
                    while self._status_due:
                        self._publish_stream_status(self._status_due.popleft(), now)
            connections = self.connections
            if connections is not None:
                if now >= next_events:
                    next_events = now + _POLL_CAP_MS * 1_000_000
                    connections.read_events()
                if connections.dropped and self._drained:
                    connections.reconnect_abandoned(now)
            if now >= next_sweep:
                next_sweep = now + _SWEEP_NS
                self._evict_idle(now)
                problem = self.journal.check_file()
                if problem:
                    log(f"WARNING: {problem}")
                if self.journal.pending and self._drained:
                    self._retry_journal()
            if now >= next_status:
                self.publish_status(now)
                next_status += interval_ns
                if next_status <= now:  # fell behind (suspended?): don't burst statuses
                    next_status = now + interval_ns
        if self.journal.pending:
            self._retry_journal()
        self.publish_status(time.monotonic_ns(), final=True)
        for name in list(self._status_due):
            self._publish_stream_status(name, time.monotonic_ns())

    def _retry_journal(self) -> None:
        pending = len(self.journal.pending)
        if self.journal.flush():
            log(f"journal {self.journal.path} written again: {pending} pending row(s) committed")

    def _evict_idle(self, now_ns: int) -> None:
        """Forget streams silent for ``idle_seconds``: their open video ends (partial
        verdict), a last per-stream status says ``evicted``, their pipeline is freed."""
        for st in list(self.streams.values()):
            if now_ns - st.seen_ns < self.idle_ns:
                continue
            idle_s = (now_ns - st.seen_ns) / 1e9
            self.evicted += 1
            self._drop_stream(st, now_ns, f"no message for {idle_s:.0f} s: evicted")

    def _drop_stream(self, st: StreamState, now_ns: int, why: str) -> None:
        """Forget ``st``: its open video ends (partial verdict), a last status says
        ``evicted``, its pipeline is freed."""
        log(f"stream {st.name!r}: {why}"
            + (f" (video {st.video!r} left open: partial verdict)" if st.video else ""))
        if st.video is not None:
            st.partial = True
            self._end(st)
        self._publish_stream_status(st.name, now_ns, evicted=True)
        for name in COUNTED:  # the monitor's totals keep what it counted
            self._retired[name] += getattr(st, name)
        self.streams.pop(st.name).pipeline.close()

    # ------------------------------------------------------------ messages

    def handle(self, parts: Sequence[Any], queued: bool = False) -> None:
        """Handle one multipart message received at ``_t_recv``; never raises on bad input.

        ``queued``: more messages are waiting behind this one, so a frame may wait in its
        stream's block for them (the caller then calls `_flush_all` once they are in)."""
        try:
            message = protocol.decode(parts)
        except protocol.ProtocolError as exc:
            self._undecodable += 1
            self._bad_input(f"malformed message ignored: {exc}")
            return
        try:
            topic = message.topic
            if topic == "frame":
                self._on_frame(message, queued)
            elif topic == "video":
                if self._pending is not None:  # its frames come before its video's end
                    self._flush_all()
                self._on_video(message.header)
            # status/alarm/verdict from another monitor on the same bus: not ours, ignore
        except Exception as exc:  # a bug in a stage must not take the service down
            self.errors += 1
            self._internal(
                f"internal error on {message.topic} message of stream "
                f"{message.header.get('stream')!r}: {type(exc).__name__}: {exc}"
            )

    def _reject_long(self, parts: list[Any]) -> None:
        """Receive and drop the rest of a message of more than three parts (no valid
        message has that many); ``parts`` keeps its first three, which `handle` rejects."""
        count = len(parts)
        part = parts[-1]
        while part.more:
            part = self.sub.recv(copy=False)
            count += 1
        parts.append(zmq.Frame(b""))  # four parts: decode names the fault
        self._bad_input(f"stream message of {count} parts: dropping the parts past the third")

    def _flush_all(self) -> None:
        """Step the waiting block (the queue is empty, or a message of another topic came)."""
        st, self._pending = self._pending, None
        if st is not None and st.block.n:
            try:
                self._flush(st)
            except Exception as exc:  # as in handle: a stage's bug must not stop us
                self.errors += 1
                self._internal(f"internal error on a block of stream {st.name!r}: "
                               f"{type(exc).__name__}: {exc}")

    def _stream(self, name: str) -> StreamState | None:
        """The state of stream ``name``, made on its first message; None when it is not
        served here (not selected, or ``max_streams`` are served already)."""
        if not self.selection.matches(name):
            self.ignored += 1
            return None
        if len(self.streams) >= self.max_streams:
            # Room is made by the stream, never established, silent the longest: a
            # forged name holds a slot only until a real workstation needs it.
            spare = [st for st in self.streams.values() if not st.established]
            if not spare:
                self.refused += 1
                self.refusal = (f"stream {name!r} refused: serving --max-streams "
                                f"{self.max_streams} established streams (idle ones are "
                                f"evicted after {self.idle_ns / 1e9:g} s)")
                self._refusals(self.refusal)
                return None
            victim = min(spare, key=lambda st: st.seen_ns)
            self.reclaimed += 1
            self._drop_stream(victim, self._t_recv or time.monotonic_ns(),
                              f"reclaimed for new stream {name!r}: --max-streams "
                              f"{self.max_streams} reached and it never had a workpiece")
        if self._spares:
            pipeline = self._spares.pop()
            pipeline.stream = name
        else:
            pipeline = self.make_pipeline(name)
        state = StreamState(name, pipeline, self._t_recv or time.monotonic_ns())
        self.streams[name] = state
        log(f"stream {name!r}: new, pipeline state: "
            f"{model_state(state.pipeline, state.pipeline.status())}")
        return state

    def _start(self, st: StreamState, video: str, type_id: int, metadata: dict,
               partial: bool) -> None:
        if st.video is not None:
            # the open video never got its `video end`: publisher restarted or lost it
            st.partial = True
            self._end(st)
        st.video = video
        st.type = type_id
        st.videos += 1
        st.partial = partial
        st.video_frames = 0
        st.workpiece = False
        st.recorded = self._short_budget.take()
        self._emit(st.pipeline.start_video(video, type_id, metadata), st,
                   opened={"stream": st.name, "video": video, "type": type_id})

    def _workpiece(self, st: StreamState) -> None:
        """The open video reached MIN_WORKPIECE_FRAMES: give its short-video token back,
        or journal and publish what was held back for it."""
        st.workpiece = st.established = True
        if st.recorded:
            self._short_budget.give()
            return
        st.recorded = True
        held, st.held = st.held, []
        opened, st.held_open = st.held_open, None
        self._emit(held, st, opened)

    def _end(self, st: StreamState) -> None:
        # clear events for alarms still active, then the verdict
        events = st.pipeline.end_video_events()
        st.video = None
        if not st.recorded:  # held back and never a workpiece: counted, not journaled
            st.short_videos += 1
            dropped = len(st.held) + len(events)
            st.suppressed += dropped
            st.held, st.held_open, st.recorded = [], None, True
            self._churn(f"stream {st.name!r}: video of {st.video_frames} frame(s) ended "
                        f"before {MIN_WORKPIECE_FRAMES} with the short-video budget spent "
                        f"({SHORT_VIDEO_BURST}, +{SHORT_VIDEOS_PER_S:g}/s): its {dropped} "
                        "event(s) counted, not journaled (video churn: a broken or hostile "
                        "publisher?)")
        else:
            self._emit(events, st)
        st.partial = False

    def _on_video(self, header: dict) -> None:
        name = header["stream"]
        st = self.streams.get(name) or self._stream(name)
        if st is None:
            return
        st.seen_ns = self._t_recv
        if header["event"] == "start":
            st.video_start_seen = True
            self._start(st, header["video"], header["type"], header["metadata"], False)
        elif st.video == header["video"]:
            self._end(st)

    def _on_frame(self, message: Any, queued: bool = False) -> None:
        header = message.header
        name = header["stream"]
        st = self.streams.get(name) or self._stream(name)
        if st is None:
            return
        seq = header["seq"]
        last = st.last_seq
        block = st.block
        t_ns = header["t_ns"]
        if not self._t_recv - MAX_FRAME_AGE_NS <= t_ns <= self._t_recv + CLOCK_SLACK_NS:
            self._check_time(st, header)
        if block.n:
            if seq == last + 1 and block.continues(header):
                block.append(header, message.payload, self._t_recv)
                st.last_seq = seq
                if block.n == block.capacity or not queued:
                    self._flush(st)
                return
            self._flush(st)
        # On its line: the next seq (or a plausible gap) of the open video. A frame off it
        # is rejected, unless it is part of a run that shows a restart (`_follows`).
        other_video = st.video is not None and (header["video"] != st.video
                                                or header["type"] != st.type)
        if last is not None and seq != last + 1:
            if last < seq <= last + MAX_SEQ_GAP and not other_video:
                lost = seq - last - 1
                st.dropped += lost
                self._gaps(f"stream {st.name!r}: {lost} frame(s) lost before seq {seq}")
                if st.video is not None:
                    self._emit(st.pipeline.note_lost(lost, header), st)
            elif not self._follows(st, header):
                self._reject(st, header)
                return
        elif other_video and not self._follows(st, header):
            self._reject(st, header)
            return
        st.last_seq = seq
        st.restart_run = 0
        st.video_start_seen = False
        if st.video != header["video"] or st.type != header["type"]:
            # Joined mid-stream, lost the `video start`, or followed a run of another
            # video: start from this frame on.
            self._start(st, header["video"], header["type"], {}, header["frame"] != 0)
        block.start(header, message.payload, self._t_recv)
        if queued:  # more behind it: wait for them in the block (`_flush_all` follows)
            self._pending, self._pending_topic = st, st.frame_topic
            return
        self._flush(st)

    def _flush(self, st: StreamState) -> None:
        """Step the frames waiting in ``st``'s block (a lone frame is a block of one): one
        compiled call (`process_block` stops inside at each frame with an alarm change),
        then one latency record per frame, all stamped with the time the block was done."""
        block = st.block
        n, header = block.n, block.header
        events = block.step(st.pipeline)
        st.video_frames += n
        if st.video_frames >= MIN_WORKPIECE_FRAMES and not st.workpiece:
            self._workpiece(st)
        if events:
            self._emit(events, st)
        done = time.monotonic_ns()
        log = self.latency_log
        if n == 1:  # the 1 kHz case: no arrays
            total = (done - block.t_ns0) / 1000.0
            st.latency.record(total, (done - block.t_recv0) / 1000.0)
            if log is not None:
                if self.latency_logged < log.shape[0]:
                    log[self.latency_logged] = total
                self.latency_logged += 1
        else:
            totals = (done - np.array(block.t_ns, dtype=np.int64)) / 1000.0
            st.latency.record_block(
                totals, (done - np.array(block.t_recv, dtype=np.int64)) / 1000.0)
            if log is not None:
                at = self.latency_logged
                if at < log.shape[0]:
                    log[at:at + n] = totals[:log.shape[0] - at]
                self.latency_logged += n
        st.seen_ns = block.t_recv_last
        st.frames += n
        st.frame = header["frame"] + n - 1

    def _follows(self, st: StreamState, header: dict[str, Any]) -> bool:
        """True when a frame off the stream's line is to be followed: seq 0 of the video
        just started (a publisher's restart), or the RESTART_RUN-th of consecutive seqs
        of one video and type off the line."""
        seq = header["seq"]
        key = (header["video"], header["type"])
        if seq == 0 and st.video_start_seen and key == (st.video, st.type):
            log(f"stream {st.name!r}: publisher restarted (video start, then seq 0 "
                f"after {st.last_seq}); following it")
            return True
        if st.restart_next == seq and st.restart_key == key:
            st.restart_run += 1
        else:
            st.restart_run = 1
            st.restart_key = key
        st.restart_next = seq + 1
        if st.restart_run < RESTART_RUN:
            return False
        what = "seq restarted" if key == (st.video, st.type) else (
            f"video {key[0]!r} Type{key[1]} without a video start")
        log(f"stream {st.name!r}: {what} at seq {seq - RESTART_RUN + 1} (after "
            f"{st.last_seq}), {RESTART_RUN} consecutive frames; following it")
        return True

    def _reject(self, st: StreamState, header: dict[str, Any]) -> None:
        """Count and report a frame off the stream's line that is not followed."""
        st.malformed += 1
        seq, last = header["seq"], st.last_seq
        if last is not None and seq <= last:
            why = f"frame seq {seq} after {last} (out of order or duplicate)"
        elif last is not None and seq > last + MAX_SEQ_GAP:
            why = (f"frame seq {seq} after {last}: a jump beyond {MAX_SEQ_GAP} frames is no "
                   "gap (forged, or a restart)")
        else:
            why = (f"frame of video {header['video']!r} Type{header['type']} while video "
                   f"{st.video!r} Type{st.type} is open, without a video start")
        self._bad_input(f"stream {st.name!r}: {why}, ignored (followed only after "
                        f"{RESTART_RUN} consecutive frames)")

    def _check_time(self, st: StreamState, header: dict[str, Any]) -> None:
        """Replace an implausible ``t_ns`` (older than MAX_FRAME_AGE_NS or in the future
        at receipt) by the receipt time, and count it: the frame's latency is then its
        service time, never a figure off by 10^15 µs."""
        now = time.monotonic_ns()
        t_recv = self._t_recv or now  # 0: handled outside the loop (tests)
        t_ns = header["t_ns"]
        if t_recv - MAX_FRAME_AGE_NS <= t_ns <= max(t_recv, now) + CLOCK_SLACK_NS:
            return
        st.bad_time += 1
        self._bad_input(f"stream {st.name!r}: frame seq {header['seq']} has t_ns {t_ns}, "
                        f"{(t_recv - t_ns) / 1e9:.3g} s before its receipt: not this host's "
                        "CLOCK_MONOTONIC; its latency is taken from receipt")
        header["t_ns"] = t_recv

    # ------------------------------------------------------------ publishing

    def _emit(self, events: Iterable[Event] | None, st: StreamState | None = None,
              opened: dict[str, Any] | None = None) -> None:
        """Journal the events (and a video start, ``opened``) in one transaction, then
        publish them (never the other way).

        When the journal cannot be written (disk full, read-only) the events are published
        all the same, with the seqs they will have once the journal takes them again
        (``Journal.record`` keeps them pending); the error is counted in status. A verdict
        of a video not seen from its start (``st.partial``) goes out as ``partial``.
        """
        if not events and opened is None:
            return
        if st is not None and not st.recorded:  # a held-back video (`_workpiece`)
            if opened is not None:
                st.held_open = opened
            room = MAX_HELD_EVENTS - len(st.held)
            events = list(events or ())
            st.held.extend(events[:max(room, 0)])
            over = len(events) - max(room, 0)
            if over > 0:
                st.suppressed += over
            return
        outgoing: list[tuple[str, dict[str, Any]]] = []
        partial = st is not None and st.partial
        for event in events or ():
            if partial and isinstance(event, Verdict):
                outgoing.append(protocol.to_wire(event, partial=True))
            else:
                outgoing.append(protocol.to_wire(event))
        alarms = [h for topic, h in outgoing if topic == "alarm"]
        verdicts = [h for topic, h in outgoing if topic == "verdict"]
        seqs, committed = self.journal.record(alarms, verdicts, opened)
        for header, seq in zip(alarms, seqs, strict=True):
            header["seq"] = seq
        if not committed:
            health = self.journal.health()
            self._journal_log(f"journal {self.journal.path} not written ({health['last_error']});"
                              f" {health['pending']} row(s) pending, published anyway")
        for topic, header in outgoing:
            self.pub.send_multipart(protocol.encode(topic, header))
            if topic == "alarm":
                self.alarms += 1
            else:
                self.verdicts += 1

    def report_interrupted(self) -> int:
        """Journal and publish a partial verdict for every video the journal says was open
        when this monitor last stopped (SIGKILL, crash): kinds ``["interrupted"]``,
        ``alarms`` the raises journaled for it. Returns how many."""
        rows = self.journal.open_videos()
        for row in rows:
            log(f"stream {row['stream']!r}: video {row['video']!r} (Type{row['type']}) was "
                f"interrupted: the monitor stopped before its verdict (started {row['time']}, "
                f"{row['alarms']} alarm(s) raised); reported as a partial verdict")
            self._emit([Verdict(row["stream"], row["video"], row["type"], frames=0, score=0.0,
                                anomalous=row["alarms"] > 0, alarms=row["alarms"],
                                kinds=["interrupted"], partial=True)])
        return len(rows)

    def status(self, now_ns: int, final: bool = False) -> dict[str, Any]:
        """The ``status`` of the whole monitor (stream ``*``): totals and the latency of
        every frame of the interval; per-stream detail goes out as ``stream_status``."""
        windows = [st.latency.window() for st in self.streams.values()]
        total = np.concatenate([w[0] for w in windows]) if windows else np.zeros(0)
        service = np.concatenate([w[1] for w in windows]) if windows else np.zeros(0)
        top = max((w[2] for w in windows), default=0.0)
        service_top = max((w[3] for w in windows), default=0.0)
        return {
            "v": protocol.SCHEMA_VERSION,
            "stream": protocol.ALL_STREAMS,
            "t_ns": now_ns,
            "frames": self.total("frames"),
            "dropped": self.total("dropped"),
            "malformed": self.total("malformed"),
            "bad_time": self.total("bad_time"),
            "errors": self.errors,
            **(self.connections.status() if self.connections is not None
               else FrameConnections.NONE),
            "alarms": self.alarms,
            "verdicts": self.verdicts,
            "latency_us": percentile_summary(total, top),
            "service_us": percentile_summary(service, service_top),
            "uptime_s": round((now_ns - self.started_ns) / 1e9, 3),
            "model": self.model_note,
            "streams": len(self.streams),
            "max_streams": self.max_streams,
            "selection": str(self.selection)[: protocol.MAX_NAME * 8],
            "ignored": self.ignored,
            "refused": self.refused,
            "refusal": self.refusal,
            "evicted": self.evicted,
            "reclaimed": self.reclaimed,
            "short_videos": self.total("short_videos"),
            "suppressed": self.total("suppressed"),
            "journal": self.journal.health(),
            "final": final,
        }

    def stream_status(self, name: str, now_ns: int, evicted: bool = False) -> dict[str, Any]:
        """The ``status`` of one stream (its own topic ``status/<name>/``). Its latency
        covers the frames up to the monitor's status that queued it (the same frames as
        that one's), else up to now."""
        st = self.streams[name]
        pipeline_status = st.pipeline.status()
        interval, st.interval = st.interval or st.latency.take(), None
        latency, service = interval.summary()
        return {
            "v": protocol.SCHEMA_VERSION,
            "stream": name,
            "t_ns": now_ns,
            "frames": st.frames,
            "dropped": st.dropped,
            "malformed": st.malformed,
            "bad_time": st.bad_time,
            "latency_us": latency,
            "service_us": service,
            "uptime_s": round((now_ns - self.started_ns) / 1e9, 3),
            "video": st.video,
            "type": st.type,
            "frame": st.frame,
            "videos": st.videos,
            "short_videos": st.short_videos,
            "suppressed": st.suppressed,
            "idle_s": round(max(0, now_ns - st.seen_ns) / 1e9, 3),
            "evicted": evicted,
            "model": model_state(st.pipeline, pipeline_status),
            "pipeline": pipeline_status,
        }

    def publish_status(self, now_ns: int, final: bool = False) -> dict[str, Any] | None:
        """Publish the monitor's status now and queue every stream's for the next turns."""
        try:
            header = self.status(now_ns, final)
            self.pub.send_multipart(protocol.encode("status", header))
        except Exception as exc:  # a status that cannot be sent must not stop the service
            header = self._send_minimal_status(protocol.ALL_STREAMS, now_ns, exc, final)
        self._status_due.clear()
        self._status_due.extend(self.streams)
        for st in self.streams.values():  # the interval `header` covered, for their own
            st.interval = st.latency.take()
        return header

    def _publish_stream_status(self, name: str, now_ns: int, evicted: bool = False) -> None:
        if name not in self.streams:
            return  # evicted since it was queued
        try:
            header = self.stream_status(name, now_ns, evicted)
            self.pub.send_multipart(protocol.encode("status", header))
        except Exception as exc:
            self._send_minimal_status(name, now_ns, exc)

    def _send_minimal_status(self, name: str, now_ns: int, exc: Exception,
                             final: bool = False) -> dict[str, Any] | None:
        """After a status failed to encode or send: one with the required fields only,
        every count clamped to int64, and ``status_error`` saying why (status never stops)."""
        self.errors += 1
        reason = f"{type(exc).__name__}: {exc}"
        self._internal(f"status of {name!r} not published ({reason}); sent a minimal one")
        st = self.streams.get(name)
        src = self if st is None else st
        empty = {"p50": None, "p99": None, "p999": None, "max": None}
        header = {
            "v": protocol.SCHEMA_VERSION, "stream": name, "t_ns": now_ns,
            "frames": _clamp(src.frames), "dropped": _clamp(src.dropped),
            "malformed": _clamp(src.malformed), "errors": _clamp(self.errors),
            "latency_us": empty, "uptime_s": round((now_ns - self.started_ns) / 1e9, 3),
            "status_error": reason[:200], "final": final,
        }
        try:
            self.pub.send_multipart(protocol.encode("status", header))
        except Exception as again:
            self._internal(f"minimal status of {name!r} not published either: "
                           f"{type(again).__name__}: {again}")
            return None
        return header


def _clamp(count: Any) -> int:
    """``count`` as an int within 0..INT64_MAX (what a status field may carry)."""
    try:
        return min(max(int(count), 0), protocol.INT64_MAX)
    except (TypeError, ValueError, OverflowError):
        return 0


def __getattr__(name: str) -> Any:
    """``serve`` and ``_warm_up`` live in `lhtstream.service.launch` (which imports this
    module); here on first use, so ``from lhtstream.service.monitor import serve`` works."""
    if name in ("serve", "_warm_up", "_pipeline_factory"):
        from lhtstream.service import launch  # local import: launch imports this module

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
