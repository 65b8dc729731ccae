"""Replay as a separate OS process over real ZeroMQ (ipc:// and tcp://127.0.0.1)."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest

from lhtstream.io.dataset import save_metadata
from lhtstream.io.protocol import decode, frame_array
from tests.processes import ProcessGroup, Subscriber, ipc_endpoint, run_cli, tcp_endpoint

# Two short videos of different ROI sizes; video 0001 has two obstacle windows.
VIDEOS = {
    "0001": dict(frames=300, rows=16, cols=22, windows=[(50, 120), (200, 250)]),
    "0002": dict(frames=200, rows=8, cols=10, windows=[]),
}
JITTER_LINE = r"pacing jitter p50=(\d+) p99=(\d+) max=(\d+) us over (\d+) ticks"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny data set in the published format, written from a fixed seed."""
    root = tmp_path_factory.mktemp("replay-data")
    folder = root / "Type3"
    folder.mkdir()
    rng = np.random.default_rng(1234)
    metadata, frames = {}, {}
    for i, (name, spec) in enumerate(VIDEOS.items()):
        image = rng.integers(0, 1025, size=(spec["frames"], spec["rows"], spec["cols"]))
        image = image.astype(np.uint16)
        np.savez_compressed(folder / f"{name}.npz", image=image)
        windows = spec["windows"] + [(-1, -1)] * (2 - len(spec["windows"]))
        metadata[name] = {
            "Index": i + 1,
            "KeyfIniObstacle1": windows[0][0], "KeyfEndObstacle1": windows[0][1],
            "KeyfIniObstacle2": windows[1][0], "KeyfEndObstacle2": windows[1][1],
            "LeftBordPx": 3, "RightBordPx": 3 + spec["cols"] - 1,
            "SupBordPx": 5, "InfBordPx": 5 + spec["rows"] - 1,
            "SizeInFrames": spec["frames"],
        }
        frames[name] = image
    save_metadata(folder / "metadata.pkl", metadata)
    return root, frames


def expected_obstacles(name: str) -> np.ndarray:
    spec = VIDEOS[name]
    states = np.zeros(spec["frames"], dtype=int)
    for n, (first, last) in enumerate(spec["windows"], start=1):
        states[first:last + 1] = n
    return states


@pytest.fixture
def procs():
    with ProcessGroup() as group:
        yield group


def collect(sub: Subscriber, streams: int = 1, timeout: float = 30.0) -> list:
    """Decoded messages until every stream sent the end of its last video (0002 or 0001)."""
    messages, ended = [], set()
    deadline = time.monotonic() + timeout
    while len(ended) < streams:
        assert time.monotonic() < deadline, f"replay incomplete; got {len(messages)} messages"
        message = decode(sub.recv(timeout=timeout))
        messages.append(message)
        h = message.header
        if message.topic == "video" and h["event"] == "end":
            # stream i starts at video i, so its last video is the other one
            last = "0002" if h["stream"] == "ws1" else "0001"
            if h["video"] == last:
                ended.add(h["stream"])
    return messages


def check_stream(messages: list, frames: dict, stream: str, order: list[str],
                 skipped: frozenset[int] = frozenset()) -> None:
    """All frames of each video in ``order``, in order, bytes equal, seq gapless but ``skipped``."""
    mine = [m for m in messages if m.header["stream"] == stream]
    expected_topics = []
    for name in order:
        expected_topics += [("video", name, "start")]
        expected_topics += [("frame", name, i) for i in range(VIDEOS[name]["frames"])]
        expected_topics += [("video", name, "end")]
    seq = 0
    expected = []
    for topic, name, what in expected_topics:
        if topic == "frame":
            if seq not in skipped:
                expected.append((topic, name, what, seq))
            seq += 1
        else:
            expected.append((topic, name, what, None))
    got = [(m.topic, m.header["video"],
            m.header["frame"] if m.topic == "frame" else m.header["event"],
            m.header["seq"] if m.topic == "frame" else None) for m in mine]
    assert got == expected
    for m in mine:
        h = m.header
        assert h["type"] == 3
        if m.topic == "frame":
            np.testing.assert_array_equal(frame_array(m), frames[h["video"]][h["frame"]])
            assert h["obstacle"] == expected_obstacles(h["video"])[h["frame"]]
        else:
            assert h["metadata"]["SizeInFrames"] == VIDEOS[h["video"]]["frames"]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_replay_delivers_every_frame_in_order_at_1khz(procs, dataset, tmp_path, transport):
    root, frames = dataset
    endpoint = ipc_endpoint(tmp_path) if transport == "ipc" else tcp_endpoint()
    replay = procs.cli("replay", root, "--endpoint", endpoint)
    with Subscriber(endpoint) as sub:
        messages = collect(sub)
    check_stream(messages, frames, "ws1", ["0001", "0002"])
    assert replay.wait(timeout=30) == 0
    # Paced at 1 kHz on an absolute schedule: frame k is due k ms after the first tick and
    # is stamped (t_ns) as it is sent, never before it is due. So t_ns[k] - k ms is the
    # start plus frame k's lateness: flat but for the bursts after a stall (the replay
    # catching up), a ramp of 0.5 ms per frame at 2 kHz or 500 Hz, and 4 ms over 400
    # frames for a clock 1 % off. The on-time frames (the lower envelope) show the ramp
    # whatever the machine's load does to the others.
    t_ns = np.array([m.header["t_ns"] for m in messages if m.topic == "frame"], np.int64)
    assert (np.diff(t_ns) > 0).all()
    offset = t_ns - np.arange(len(t_ns)) * 1_000_000
    late_us = (offset - offset.min()) / 1000.0
    drift_us = late_us[-100:].min() - late_us[:100].min()
    assert abs(drift_us) < 1000, f"not paced at 1 kHz: {drift_us:.0f} us drift in 400 ms"
    # the replay's own account of its lateness (µs, taken just before the stamp) agrees
    p50, p99, peak, ticks = map(int, re.search(JITTER_LINE, replay.stderr).groups())
    assert ticks == len(t_ns) == 500
    assert abs(p50 - np.median(late_us)) <= 200, (p50, p99, peak, np.median(late_us))
    assert peak <= late_us.max() + 200, (peak, late_us.max())


def test_two_streams_are_separate_and_offset(procs, dataset, tmp_path):
    root, frames = dataset
    endpoint = ipc_endpoint(tmp_path)
    replay = procs.cli("replay", root, "--endpoint", endpoint, "--streams", "2",
                       "--rate", "max")
    with Subscriber(endpoint) as sub:
        messages = collect(sub, streams=2)
    check_stream(messages, frames, "ws1", ["0001", "0002"])
    check_stream(messages, frames, "ws2", ["0002", "0001"])
    assert replay.wait(timeout=30) == 0


def test_skip_leaves_a_seq_gap(procs, dataset, tmp_path):
    """``replay(skip=...)`` (a library parameter for tests of lost frames; the production
    replay on a thread of this process, on a real socket) leaves exactly those seqs out."""
    root, frames = dataset
    endpoint = tcp_endpoint()
    skipped = frozenset({0, 5, 6, 299, 300, 499})
    replay = procs.replay_thread(root, endpoint, rate=None, skip=sorted(skipped))
    with Subscriber(endpoint) as sub:
        messages = collect(sub)
    check_stream(messages, frames, "ws1", ["0001", "0002"], skipped)
    stats = replay.wait(timeout=30)
    assert stats.frames_skipped == len(skipped)


def test_wait_subscribers_holds_frames_until_all_joined(procs, dataset, tmp_path):
    root, frames = dataset
    endpoint = ipc_endpoint(tmp_path)
    replay = procs.cli("replay", root, "--endpoint", endpoint, "--rate", "max",
                       "--wait-subscribers", "2", "--videos", "0002")
    with Subscriber(endpoint) as first:
        replay.wait_for_stderr(r"frame subscriber joined \(1\)")
        time.sleep(1.0)  # at max rate the whole video would be gone by now
        assert not first.socket.poll(0), "replay published before the second subscriber"
        with Subscriber(endpoint, topics=("frame",)) as second:
            got_first = [decode(first.recv()) for _ in range(202)]
            got_second = [decode(second.recv()) for _ in range(200)]
    assert [m.header.get("seq") for m in got_first if m.topic == "frame"] == list(range(200))
    assert [m.header["seq"] for m in got_second] == list(range(200))
    assert (got_first[0].topic, got_first[-1].topic) == ("video", "video")
    assert replay.wait(timeout=30) == 0


def test_sigterm_stops_a_looping_replay_with_exit_0_and_jitter(procs, dataset, tmp_path):
    root, _ = dataset
    replay = procs.cli("replay", root, "--endpoint", ipc_endpoint(tmp_path), "--loop",
                       "--wait-subscribers", "0")
    replay.wait_for_stderr(r"stream\(s\), rate 1000/s")
    t0 = time.monotonic()
    time.sleep(1.0)
    assert replay.returncode is None  # --loop keeps going
    replay.signal(signal.SIGTERM)
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert replay.wait(timeout=15) == 0
    match = re.search(JITTER_LINE, replay.stderr)
    assert match, replay.stderr
    ticks = int(match.group(4))
    sent = int(re.search(r"stopped: (\d+) frames", replay.stderr).group(1))
    assert sent > 300  # it looped past the first video's 300 frames
    # one frame per tick, 1000 ticks per second of the ~1 s it ran (the line came a
    # little after the first tick, the stop a little after the signal)
    assert ticks == sent
    assert 0.8 * elapsed_ms <= sent <= 1.2 * elapsed_ms + 100, (sent, elapsed_ms)
    assert "Traceback" not in replay.stderr


def test_summary_json_is_the_summary_the_replay_prints(procs, dataset, tmp_path):
    """``--summary-json FILE``: the numbers of the two stderr summary lines, as JSON, for
    a run to its end and for one stopped by SIGTERM."""
    root, frames = dataset
    summary = tmp_path / "done.json"
    done = run_cli("replay", root, "--endpoint", ipc_endpoint(tmp_path, "a"), "--rate", "2000",
                   "--wait-subscribers", "0", "--summary-json", summary, timeout=120)
    assert done.returncode == 0, done.stderr
    s = json.loads(summary.read_text())
    assert s["frames_sent"] == sum(len(f) for f in frames.values()) == 500
    assert s["stopped"] is False and s["videos_started"] == 2 and s["streams"] == ["ws1"]
    j = re.search(JITTER_LINE, done.stderr)
    # the line prints them rounded to the us
    assert [round(s["jitter_us"][k]) for k in ("p50", "p99", "max")] == [int(j[1]), int(j[2]),
                                                                          int(j[3])]
    assert s["jitter_us"]["n"] == int(j[4]) == s["ticks"] == 500
    assert 0.24 <= s["seconds"] < 2.0  # 500 frames paced at 2000/s take 0.25 s
    assert f"{s['seconds']:.2f} s" in done.stderr

    stopped = tmp_path / "stopped.json"
    replay = procs.cli("replay", root, "--endpoint", ipc_endpoint(tmp_path, "b"), "--loop",
                       "--wait-subscribers", "0", "--summary-json", stopped)
    replay.wait_for_stderr(r"stream\(s\), rate 1000/s")
    time.sleep(0.7)
    replay.signal(signal.SIGTERM)
    assert replay.wait(timeout=15) == 0
    s = json.loads(stopped.read_text())
    sent = int(re.search(r"stopped: (\d+) frames", replay.stderr).group(1))
    assert s["stopped"] is True and s["frames_sent"] == sent > 300


BLOCKED_LOAD = """
import sys, threading
import lhtstream.service.replay as r
from lhtstream.cli.parser import main

def never(what):
    print("loading", what, file=sys.stderr, flush=True)
    threading.Event().wait()

if sys.argv.pop(1) == "data set":
    real = r.Dataset
    class Dataset(real):  # reading the data set's metadata never ends
        def __init__(self, *args, **kwargs):
            never("data set")
    r.Dataset = Dataset
else:
    r._load = lambda video, stream, first_seq: never(video.name)  # nor one video's load
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("blocked, what", [("data set", "the data set {root}"),
                                           ("video", "Type3 video 0001")])
def test_sigterm_ends_a_replay_whatever_it_is_loading(procs, dataset, tmp_path, blocked,
                                                      what):
    """A load that never ends (in the field: a hostile pickle, a stalled mount; here the
    data set's reader or the video loader, replaced in-process by one that blocks for
    good): SIGTERM still ends the replay at once, exit 0, naming what it was loading.
    The data set is read in the main thread, a video on a worker thread."""
    import subprocess
    import sys

    from tests.processes import _child_env

    root, _ = dataset
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_LOAD, blocked, "replay", str(root), "--endpoint",
         ipc_endpoint(tmp_path), "--wait-subscribers", "0"], env=_child_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("loading"):
            line = proc.stderr.readline()
            assert line, "the replay ended before it began loading"
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and elapsed < 2.0, (code, elapsed, err)
    assert f"replay: stopped by SIGTERM while loading {what.format(root=root)}" in err
    assert "Traceback" not in err


def test_a_zero_frame_video_is_a_one_line_error(tmp_path, dataset):
    import shutil

    from lhtstream.io.dataset import load_metadata

    root = tmp_path / "data"
    shutil.copytree(dataset[0], root)
    folder = root / "Type3"
    meta = load_metadata(folder / "metadata.pkl")
    meta["0002"]["SizeInFrames"] = 0
    save_metadata(folder / "metadata.pkl", meta)
    spec = VIDEOS["0002"]
    np.savez(folder / "0002.npz", image=np.zeros((0, spec["rows"], spec["cols"]), np.uint16))
    out = run_cli("replay", root, "--endpoint", ipc_endpoint(tmp_path), "--rate", "5000",
                  "--wait-subscribers", "0", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (error,) = [line for line in out.stderr.splitlines() if "error" in line]
    assert "0002" in error and "SizeInFrames" in error


def test_jitter_percentiles_are_nearest_rank_in_us():
    from lhtstream.service.replay import _Jitter

    jitter = _Jitter()
    for late_us in np.random.default_rng(2).permutation(100):  # 0..99 µs late, shuffled
        jitter.add(int(late_us) * 1000 + 400)  # ns; sub-µs parts round down
    # 100 values 0..99: the 50th smallest is 49, the 99th 98, the 99.9 % one the 100th
    assert jitter.percentiles() == {"n": 100.0, "p50": 49.0, "p99": 98.0, "p999": 99.0,
                                    "max": 99.4}
    jitter.add(500_000_000)  # half a second late: beyond the histogram, max still exact
    assert jitter.percentiles()["max"] == 500_000.0


def test_tap_json_count_against_replay(procs, dataset, tmp_path):
    root, frames = dataset
    endpoint = tcp_endpoint()
    replay = procs.cli("replay", root, "--endpoint", endpoint, "--videos", "0001")
    tap = procs.cli("tap", "--endpoint", endpoint, "--topic", "frame", "--json",
                    "--count", "20", "--timeout", "60")
    assert tap.wait(timeout=60) == 0
    records = [json.loads(line) for line in tap.stdout.splitlines()]
    assert [r["seq"] for r in records] == list(range(20))
    assert all(r["topic"] == "frame" and r["shape"] == [16, 22] for r in records)
    assert [r["obstacle"] for r in records] == [0] * 20
    assert replay.wait(timeout=30) == 0


@pytest.mark.parametrize("args,message", [
    (["--videos", "9999"], "no videos match"),
    (["--rate", "fast"], "argument --rate: 'fast' is not a number"),
    (["--rate", "0"], "argument --rate: 0 is out of range"),
])
def test_bad_arguments_give_one_line_errors(dataset, tmp_path, args, message):
    root, _ = dataset
    result = run_cli("replay", root, "--endpoint", ipc_endpoint(tmp_path), *args,
                     "--wait-subscribers", "0", timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_endpoint_in_use_is_a_one_line_error(procs, dataset, tmp_path):
    root, _ = dataset
    endpoint = tcp_endpoint()
    first = procs.cli("replay", root, "--endpoint", endpoint)  # waits for a subscriber
    first.wait_for_stderr("waiting for 1")
    result = run_cli("replay", root, "--endpoint", endpoint, timeout=30)
    assert result.returncode == 2
    assert "cannot bind" in result.stderr and "Traceback" not in result.stderr


def test_replays_simulator_output_with_obstacle_windows(procs, tmp_path):
    """The simulator's files (real format, metadata from its pickle) go out unchanged."""
    from lhtstream.io.dataset import Dataset
    from lhtstream.io.simulate import synthesize

    # Type 3 is a workpiece with two obstacles, so both windows occur in 400 frames.
    synthesize(tmp_path / "sim", types=[3], videos_per_type=2, frames=400, seed=3)
    videos = list(Dataset(tmp_path / "sim").videos())
    assert all(set(v.obstacle_states().tolist()) == {0, 1, 2} for v in videos)
    endpoint = ipc_endpoint(tmp_path)
    replay = procs.cli("replay", tmp_path / "sim", "--endpoint", endpoint, "--rate", "max")
    with Subscriber(endpoint) as sub:
        messages = collect(sub)
    assert replay.wait(timeout=30) == 0
    for video in videos:
        got = [m for m in messages if m.topic == "frame" and m.header["video"] == video.name]
        pixels = np.stack([frame_array(m) for m in got])
        np.testing.assert_array_equal(pixels, video.load())
        np.testing.assert_array_equal([m.header["obstacle"] for m in got],
                                      video.obstacle_states())
    starts = [m.header for m in messages if m.topic == "video" and m.header["event"] == "start"]
    assert [h["metadata"] for h in starts] == [dict(v.metadata) for v in videos]
