"""Property-based fuzzing (hypothesis) of the wire decoder and of a live monitor.

Random bytes, random msgpack maps and valid headers with one field pushed to a boundary:
``protocol.decode`` either returns a message that passes every bound or raises
ProtocolError, never anything else; a monitor fed the same never raises past its loop,
counts every message the decoder rejects as malformed, and still handles the next good
frame.
"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lhtstream.io import protocol
from lhtstream.io.journal import Journal
from tests.processes import ProcessGroup, ipc_endpoint

INT64 = 2**63 - 1
BOUNDARY_INTS = [0, 1, -1, 36, 37, INT64, INT64 + 1, -INT64 - 1, 2**64 - 1, 10**6, -5]
NAMES = ["ws1", "", "x" * 64, "x" * 65, "x" * 16_384, "a/b", "*", "café", "ws 1", "\x00"]
FIELDS = ["v", "stream", "video", "type", "seq", "frame", "t_ns", "shape", "dtype",
          "obstacle", "event", "metadata", "state", "kind", "latency_us", "frames"]

scalars = st.one_of(
    st.sampled_from(BOUNDARY_INTS),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack can carry
    st.floats(allow_nan=True), st.booleans(), st.none(), st.sampled_from(NAMES),
    st.text(max_size=70), st.binary(max_size=40),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
topics = st.one_of(
    st.sampled_from([b"frame/ws1/", b"video/ws1/", b"status/*/", b"alarm/ws1/", b"verdict/ws1/",
                     b"frame", b"frame/", b"frame//", b"frame/*/", b"frame/ws1", b"status/ws1/"]),
    st.binary(max_size=30),
)


def good_header(seq: int = 0) -> dict:
    return {"v": protocol.SCHEMA_VERSION, "stream": "ws1", "video": "0001", "type": 1,
            "seq": seq, "frame": seq, "t_ns": time.monotonic_ns(), "shape": [4, 5],
            "dtype": "<u2", "obstacle": 0}


PIXELS = np.arange(20, dtype="<u2").reshape(4, 5).tobytes()


@st.composite
def messages(draw) -> list[bytes]:
    """One multipart message: raw junk, a random map, or a good frame with one field
    replaced by something hostile."""
    kind = draw(st.sampled_from(["bytes", "map", "mutated"]))
    if kind == "bytes":
        return draw(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
    if kind == "map":
        header = draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values,
                                      max_size=12))
        parts = [draw(topics), msgpack.packb(header, use_bin_type=True)]
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from([PIXELS, b"", PIXELS[:-1], b"\x00" * 2048])
                              | st.binary(max_size=64)))
        return parts
    header = good_header(draw(st.integers(min_value=0, max_value=50)))
    field = draw(st.sampled_from(list(header)))
    header[field] = draw(values)
    return [draw(topics) if draw(st.booleans()) else b"frame/ws1/",
            msgpack.packb(header, use_bin_type=True), PIXELS]


def _rejected(batch: list[list[bytes]]) -> int:
    """How many of the messages the decoder rejects."""
    rejected = 0
    for parts in batch:
        try:
            protocol.decode(parts)
        except protocol.ProtocolError:
            rejected += 1
    return rejected


def _in_bounds(message: protocol.Message) -> None:
    """What every accepted message guarantees to the code after the decoder."""
    h = message.header
    assert h["v"] == protocol.SCHEMA_VERSION
    assert protocol.valid_name(h["stream"]) or (message.topic == "status" and h["stream"] == "*")
    for name in ("video", "kind"):
        if name in h and name in protocol._FIELDS[message.topic]:
            assert protocol.valid_name(h[name])
    for name, value in h.items():
        if type(value) is int and name in protocol._FIELDS[message.topic]:
            lo, hi = (1, 36) if name == "type" else (0, INT64)
            assert lo <= value <= hi, (name, value)
    if message.topic == "frame":
        rows, cols = h["shape"]
        assert len(message.payload) == rows * cols * 2


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_decode_accepts_only_bounded_messages_and_raises_only_protocol_error(parts):
    try:
        message = protocol.decode(parts)
    except protocol.ProtocolError as exc:
        assert exc.reason  # names the part or field
        return
    _in_bounds(message)


def _slow_decode(parts):
    """decode without the learnt layouts (msgpack and the field checks), as (header, or the
    reason it was rejected)."""
    saved = dict(protocol._layouts)
    protocol._layouts.clear()
    try:
        return protocol.decode(parts).header, None
    except protocol.ProtocolError as exc:
        return None, exc.reason
    finally:
        protocol._layouts.clear()
        protocol._layouts.update(saved)


ENCODED = protocol.EncodedFrames("ws7", "0003", 5, np.zeros((2, 4, 5), dtype="<u2"), [0, 1], 9)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
       st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([40, 38, 42]))
def test_pre_encoded_frames_decode_by_their_layout_as_msgpack_would(edits, t_ns, size):
    """Frames of a publisher writing fixed-width ints (our replay) are decoded by their
    learnt byte layout, not by msgpack: any header with a few bytes changed (in the
    slots, where the layout reads seq/frame/t_ns/obstacle, or in the bytes it compares)
    must give exactly what msgpack and the field checks give, or be rejected by both."""
    protocol.decode(ENCODED.parts(0, 1))  # learn the layout
    assert protocol._layouts[ENCODED.topic] is not None
    topic, header, payload = ENCODED.parts(1, 0)
    raw = bytearray(header)
    protocol._INT64.pack_into(raw, ENCODED.t_ns_offset, t_ns)
    for at, value in edits:
        if at < len(raw):
            raw[at] = value
    parts = [topic, bytes(raw), bytes(payload)[:size] + bytes(max(0, size - 40))]
    want, reason = _slow_decode(parts)
    try:
        got = protocol.decode(parts).header
    except protocol.ProtocolError:
        got = None
    assert got == want, reason


class _CapturePub:
    def __init__(self) -> None:
        self.sent = 0

    def send_multipart(self, parts) -> None:
        protocol.decode(parts)  # whatever the monitor publishes is valid itself
        self.sent += 1


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    from lhtstream.service.monitor import Monitor
    from lhtstream.service.pipeline import StreamPipeline

    path = tmp_path_factory.mktemp("fuzz") / "journal.sqlite"
    with Journal(path) as journal:
        yield Monitor(make_pipeline=lambda name: StreamPipeline(name, calibration_frames=300),
                      journal=journal, publish=_CapturePub(), subscribe=None)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(messages(), min_size=1, max_size=20))
def test_monitor_counts_every_rejected_message_and_never_raises(monitor, batch):
    malformed = monitor.malformed
    rejected = _rejected(batch)
    for parts in batch:
        monitor._t_recv = time.monotonic_ns()
        monitor.handle(parts)  # must not raise
    assert monitor.errors == 0
    assert monitor.malformed - malformed >= rejected  # (+ seqs going backwards)
    st_ = monitor.streams.get("ws1")
    seq = 0 if st_ is None or st_.last_seq is None else st_.last_seq + 1
    other = st_ is not None and st_.video is not None and (st_.video, st_.type) != ("0001", 1)
    if seq > protocol.INT64_MAX or other:
        # a fuzzed frame opened another video (or took the stream to the last valid seq):
        # only a `video start` begins another video mid-video (then seq 0: a restart)
        monitor.handle(protocol.encode("video", {"stream": "ws1", "video": "0001", "type": 1,
                                                 "event": "start", "metadata": {}}))
        seq = 0 if seq > protocol.INT64_MAX else seq
    monitor.handle([b"frame/ws1/", msgpack.packb(good_header(seq)), PIXELS])
    assert monitor.streams["ws1"].last_seq == seq  # the good frame was handled
    monitor.publish_status(time.monotonic_ns())  # and status still encodes


def test_live_monitor_survives_a_fuzzed_stream(tmp_path):
    """The same generator against a monitor process over ipc: afterwards it is alive,
    reports no internal error, counts at least every message the decoder rejects and
    handles a good frame."""
    strategy = st.lists(messages(), min_size=300, max_size=300)
    batch: list[list[bytes]] = []

    @settings(max_examples=1, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(sample):
        batch[:] = sample

    draw()
    rejected = _rejected(batch)
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(frames_ep)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"status/*/")
    with ProcessGroup() as procs:
        mon = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep, "--journal",
                        tmp_path / "journal.sqlite", "--status-interval", "0.2",
                        "--calibration-seconds", "0.3")
        try:
            mon.wait_for_stderr(r"ready in", timeout=120)
            sub.connect(pub_ep)
            assert pub.poll(20_000)
            while pub.poll(200):
                pub.recv()
            # only what a monitor's subscriptions (frame/, video/) let through reaches it
            delivered = [p for p in batch if p and bytes(p[0]).startswith((b"frame/", b"video/"))]
            expected = _rejected(delivered)
            for parts in delivered:
                pub.send_multipart(parts)
            pub.send_multipart([b"frame/fuzz-ok/", msgpack.packb(dict(good_header(0),
                                                                     stream="fuzz-ok")), PIXELS])
            deadline = time.monotonic() + 30
            status = None
            while time.monotonic() < deadline:
                if sub.poll(200):
                    status = msgpack.unpackb(sub.recv_multipart()[1])
                    if status["malformed"] >= expected and status["frames"] >= 1:
                        break
            assert status is not None and mon.returncode is None
            assert status["errors"] == 0
            assert status["malformed"] >= expected and status["frames"] >= 1
            assert mon.terminate(timeout=20) == 0
        finally:
            pub.close(0)
            sub.close(0)
    assert "Traceback" not in mon.stderr
    assert rejected > 100  # the corpus really was hostile


class _NullPipeline:
    """Stands in for StreamPipeline where only the monitor's bookkeeping is under test."""

    stream = "ws1"

    def start_video(self, video, type_id, metadata=None):
        return []

    def process(self, frame, header):
        return ()

    def process_block(self, frames, obstacles, header, t_ns=None):
        return []

    def note_lost(self, n, header):
        return ()

    def end_video_events(self):
        return []

    def status(self):
        return {"mode": "scoring"}

    def close(self):
        pass


forgeries = st.tuples(
    st.integers(min_value=1, max_value=400),  # after which real frame (the first sets the line)
    st.one_of(st.integers(min_value=-50, max_value=0),  # seq relative to the line: behind
              st.integers(min_value=10_001, max_value=2**62)),  # or beyond MAX_SEQ_GAP
    st.sampled_from(["0001", "evil", "x" * 64]),
    st.sampled_from([1, 1, 2, 36]),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(forgeries, max_size=40))
def test_forged_frames_off_the_line_never_displace_the_real_stream(tmp_path, forged):
    """Issue 20 items 1 and 4 as a property: whatever frames a forger interleaves that
    are off the stream's line (seq behind, or beyond MAX_SEQ_GAP ahead, or another video
    or type), every real frame is handled, nothing counts as lost, each forgery counts
    as malformed, and the status encodes. (The first frame of a stream sets its line: a
    forgery before it is followed until RESTART_RUN real frames show the real line.)"""
    from lhtstream.service.monitor import MAX_SEQ_GAP, Monitor

    assert MAX_SEQ_GAP < 10_001
    with Journal(tmp_path / f"j{time.monotonic_ns()}.sqlite") as journal:
        mon = Monitor(make_pipeline=lambda name: _NullPipeline(), journal=journal,
                      publish=_CapturePub(), subscribe=None)
        at: dict[int, list] = {}
        for where, offset, video, type_ in forged:
            at.setdefault(where, []).append((offset, video, type_))
        frames = 401
        for k in range(frames):
            for offset, video, type_ in at.get(k, ()):
                seq = max(0, k - 1 + offset)  # the line's last seq is k - 1
                if offset <= 0 and (video, type_) == ("0001", 1):
                    video = "evil"  # behind the line and of the open video: a duplicate
                mon._t_recv = time.monotonic_ns()
                mon.handle([b"frame/ws1/", msgpack.packb(dict(
                    good_header(seq), video=video, type=type_)), PIXELS])
            mon._t_recv = time.monotonic_ns()
            mon.handle([b"frame/ws1/", msgpack.packb(good_header(k)), PIXELS])
        status = mon.status(time.monotonic_ns())
    st_ = mon.streams["ws1"]
    assert mon.errors == 0 and status["dropped"] == 0
    assert (st_.last_seq, st_.video, status["frames"]) == (frames - 1, "0001", frames)
    assert status["malformed"] == len(forged)
    protocol.encode("status", status)
