"""Fault injection with real processes over real sockets (issue 11, item 3).

Each test starts replay and monitor as OS processes, breaks something on purpose —
a publisher SIGKILLed mid-video, the monitor SIGKILLed mid-video, a subscriber that
stops reading, a journal whose disk fills up — and checks what the monitor did. Every
wait is bounded; every process is gone when the test ends (``ProcessGroup``).

The checks are what must hold whatever the machine's load (nothing lost, order, gapless
seqs, who got fewer messages); no step may depend on how fast another process is: the
faults are injected when the test has seen the state they need, and the waits are long
enough for a loaded 2-core CI (each still bounded). Latency is the benchmarks' business
(bench/, `lhtstream bench`).
"""

from __future__ import annotations

import resource
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import zmq

from lhtstream.io import protocol
from lhtstream.io.journal import Journal
from tests.processes import LiveMonitor, ReplayThread, Subscriber, ipc_endpoint

FRAMES = 2000  # per video, 2 videos: 4 s at 1 kHz
WAIT = 120.0  # seconds any one condition may take on a loaded machine


@pytest.fixture(scope="module")
def data(dataset_factory) -> Path:
    return dataset_factory(types=[1], videos_per_type=2, frames=FRAMES, seed=21)


def start_monitor(procs, frames_ep, pub_ep, journal, *extra):
    mon = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep, "--journal", journal,
                    "--status-interval", "0.2", "--calibration-seconds", "0.3", *extra)
    mon.wait_for_stderr(r"ready in", timeout=WAIT)
    return mon


def collect(sub: Subscriber, until, timeout: float = WAIT) -> tuple[dict, list]:
    """Messages until a whole-monitor status satisfies ``until``: (that status, all
    decoded messages seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            msg = protocol.decode(sub.recv(timeout=0.2))
        except TimeoutError:
            continue
        seen.append(msg)
        if msg.topic == "status" and msg.header["stream"] == "*":
            last = msg.header
            if until(last):
                return last, seen
    raise AssertionError(f"condition not met within {timeout} s; last status {last}")


def test_publisher_killed_mid_video_and_restarted(procs, data, tmp_path):
    """SIGKILL the replay in the middle of video 0001, start it again: the monitor follows
    the new run at once (video start, then seq 0), the aborted video's verdict says
    partial, the replayed video's does not, and nothing counts as lost or malformed."""
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    mon = start_monitor(procs, frames_ep, pub_ep, tmp_path / "journal.sqlite")
    with Subscriber(pub_ep, ["status", "verdict"]) as sub:
        collect(sub, lambda s: True)
        # at 500 frames/s the video lasts 4 s: the kill lands in it however late we are
        first = procs.cli("replay", data, "--endpoint", frames_ep, "--videos", "0001",
                          "--rate", "500")
        killed_at, _ = collect(sub, lambda s: s["frames"] >= 300)
        first.kill()
        second = procs.cli("replay", data, "--endpoint", frames_ep, "--videos", "0001")
        assert second.wait(timeout=WAIT) == 0, second.stderr
        status, seen = collect(sub, lambda s: s["verdicts"] >= 2 and s["frames"] >= 300 + FRAMES)
    verdicts = [m.header for m in seen if m.topic == "verdict"]
    assert [(v["video"], v["partial"]) for v in verdicts] == [("0001", True), ("0001", False)]
    aborted, whole = verdicts
    assert killed_at["frames"] <= aborted["frames"] < FRAMES  # what came before the kill
    assert whole["frames"] == FRAMES
    assert status["frames"] == aborted["frames"] + FRAMES
    assert (status["dropped"], status["malformed"], status["errors"]) == (0, 0, 0)
    assert "publisher restarted" in mon.stderr
    assert mon.returncode is None


def test_monitor_sigkilled_mid_video_and_restarted(procs, data, tmp_path):
    """SIGKILL the monitor while a video streams (right after it raised a `sensor` alarm
    in it), start it again on the same journal: the journal's alarm seq stays gapless and
    continues, the interrupted video is reported as a partial verdict (kinds
    ["interrupted"], with the alarm it had raised), and the new monitor carries on with
    the stream (lost frames seen, alarms raised, videos judged)."""
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    journal = tmp_path / "journal.sqlite"
    # a 20-frame gap in every video (the replay loops 0001, 0002, ...) 1 s in, so each
    # video raises a sensor alarm and the restarted monitor meets gaps whenever it is up;
    # at 500 frames/s the kill has 3 s to land in the video of the alarm it follows
    gaps = [v * FRAMES + 500 + i for v in range(300) for i in range(20)]  # 20 min of replay
    mon = start_monitor(procs, frames_ep, pub_ep, journal)
    with Subscriber(pub_ep, ["status", "alarm"]) as sub:
        collect(sub, lambda s: True)
        # the production replay on a thread of this process: it skips seqs (lost frames)
        replay = procs.replay_thread(data, frames_ep, loop=True, rate=500.0, skip=gaps)
        _, seen = collect(sub, lambda s: s["dropped"] >= 20 and s["alarms"] >= 1)
        mon.signal(signal.SIGKILL)
    before = [m.header for m in seen if m.topic == "alarm"]
    raised = [a for a in before if a["state"] == "raise"]
    assert any(a["kind"] == "sensor" for a in raised), [(a["kind"], a["state"], a["frame"])
                                                        for a in before]
    killed_in = raised[-1]["video"]
    mon.wait(timeout=WAIT)
    again = start_monitor(procs, frames_ep, pub_ep, journal)
    with Subscriber(pub_ep, ["status", "alarm", "verdict"]) as sub:
        # its own counters: a gap it met, an alarm, a verdict besides the interrupted one
        _, seen = collect(sub, lambda s: s["dropped"] >= 20 and s["alarms"] >= 1
                          and s["verdicts"] >= 2)
    after = [m.header for m in seen if m.topic == "alarm"]
    judged = [m.header for m in seen if m.topic == "verdict"
              and m.header["kinds"] != ["interrupted"]]
    replay.stop(timeout=WAIT)  # as SIGTERM stops `lhtstream replay`: it returns, no error
    again.signal(signal.SIGTERM)
    assert again.wait(timeout=WAIT) == 0
    assert f"video {killed_in!r} (Type1) was interrupted" in again.stderr
    with Journal(journal, writer=False) as reader:
        seqs = [a["seq"] for a in reader.alarms()]
        verdicts = reader.verdicts()
    assert seqs == list(range(1, len(seqs) + 1))  # gapless across the SIGKILL
    assert after and after[0]["seq"] > max(a["seq"] for a in before)  # continued
    interrupted = [v for v in verdicts if v["kinds"] == ["interrupted"]]
    assert [(v["video"], v["partial"], v["alarms"] >= 1) for v in interrupted] == [
        (killed_in, True, True)]
    assert judged and all(v["kinds"] != ["interrupted"] for v in judged)  # went on judging


def test_subscriber_that_stops_reading_is_dropped_for_not_the_frames(procs, data, tmp_path):
    """A subscriber that never reads fills its queue; ZeroMQ's high-water mark then
    drops what the monitor publishes for it alone. The frames are all handled (a monitor
    blocked on it would handle none: its latency is measured in the benchmarks), and a
    reading subscriber still gets everything."""
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    mon = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep, "--journal",
                    tmp_path / "journal.sqlite", "--status-interval", "0.05",
                    "--calibration-seconds", "0.3")
    mon.wait_for_stderr(r"ready in", timeout=WAIT)
    stuck = zmq.Context.instance().socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(pub_ep)
    try:
        with Subscriber(pub_ep, ["status"]) as reader:
            _, before = collect(reader, lambda s: True)
            replay = procs.cli("replay", data, "--endpoint", frames_ep, "--streams", "8",
                               "--videos", "0001")
            assert replay.wait(timeout=WAIT) == 0, replay.stderr
            status, seen = collect(reader, lambda s: s["frames"] >= 8 * FRAMES)
            assert mon.terminate(timeout=WAIT) == 0  # nothing more is published
            read = len(before) + len(seen)
            while reader.socket.poll(200):
                reader.recv()
                read += 1
        got = 0
        while stuck.poll(200):
            stuck.recv_multipart()
            got += 1
    finally:
        stuck.close(0)
    assert (status["frames"], status["dropped"], status["malformed"]) == (8 * FRAMES, 0, 0)
    assert got < read, (got, read)  # the stuck subscriber lost messages, the reader did not


def _schema_pages(tmp_path: Path) -> int:
    with Journal(tmp_path / "probe.sqlite"):
        pass
    db = sqlite3.connect(tmp_path / "probe.sqlite")
    try:
        return int(db.execute("PRAGMA page_count").fetchone()[0])
    finally:
        db.close()


def test_journal_disk_full_alarms_still_published_and_error_in_status(data, tmp_path):
    """The journal may not grow past its empty schema (SQLite's max_page_count: the same
    SQLITE_FULL a full disk gives). Alarms keep being published with their seqs, the
    failed commits are counted in status with the reason, the rows committed before are
    intact, and the monitor keeps handling every frame.

    The production monitor and replay run in this process on real sockets (`LiveMonitor`,
    `ReplayThread`): the capped journal and the lost frames are injected, as no command
    line option offers them."""
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    journal = tmp_path / "journal.sqlite"
    pages = _schema_pages(tmp_path)
    gaps = [s for start in range(400, 2 * FRAMES, 250) for s in range(start, start + 3)]
    with Journal(journal, max_pages=pages) as capped, \
            LiveMonitor(frames_ep, pub_ep, capped, calibration_seconds=0.3) as mon, \
            Subscriber(pub_ep, ["status", "alarm"]) as sub:
        collect(sub, lambda s: True)
        with ReplayThread(data, frames_ep, skip=gaps) as replay:
            replay.wait(timeout=WAIT)
        status, seen = collect(
            sub, lambda s: s["frames"] + s["dropped"] >= 2 * FRAMES and s["journal"]["errors"])
        published = [m.header for m in seen if m.topic == "alarm"]
        health = status["journal"]
        assert health["errors"] >= 1 and health["pending"] >= 1
        assert "full" in health["last_error"]
        assert (status["frames"], status["dropped"]) == (2 * FRAMES - len(gaps), len(gaps))
        assert status["errors"] == 0 and mon.alive()
        seqs = [a["seq"] for a in published]
        assert len(published) > 10 and seqs == list(range(1, len(seqs) + 1))
        mon.stop()
        assert capped.pending  # what `lhtstream monitor` reports as "could not be written"
    with Journal(journal, writer=False) as reader:
        kept = reader.alarms()
    assert 0 < len(kept) < len(published)  # what fitted before the disk was full
    by_seq = {a["seq"]: a for a in published}
    for row in kept:  # committed rows are exactly what was published under their seq
        sent = by_seq[row["seq"]]
        assert (row["kind"], row["state"], row["frame"]) == (sent["kind"], sent["state"],
                                                             sent["frame"])


def test_journal_that_cannot_be_created_is_a_one_line_error(procs, tmp_path):
    """Before: `--journal /dev/null/x` ended in a FileExistsError traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    mon = procs.cli("monitor", "--frames", ipc_endpoint(tmp_path), "--publish",
                    ipc_endpoint(tmp_path, "pub"), "--journal", blocker / "journal.sqlite",
                    "--calibration-seconds", "0.3")
    assert mon.wait(timeout=WAIT) == 2
    last = [line for line in mon.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("lhtstream: error: journal ") and "cannot create it" in last
    assert "Traceback" not in mon.stderr


def test_journal_disk_full_then_freed_catches_up_gapless(procs, data, tmp_path):
    """A real disk-full on the live monitor (its RLIMIT_FSIZE lowered from outside with
    prlimit: every write past 4 KB fails, as on a full file system), then space again:
    the alarms published meanwhile reach the journal in idle time, under the seqs they
    were published with, and the journal is gapless again."""
    frames_ep, pub_ep = ipc_endpoint(tmp_path), ipc_endpoint(tmp_path, "pub")
    journal = tmp_path / "journal.sqlite"
    mon = start_monitor(procs, frames_ep, pub_ep, journal)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    gaps = [s for start in range(400, FRAMES, 250) for s in range(start, start + 3)]
    with Subscriber(pub_ep, ["status", "alarm"]) as sub:
        collect(sub, lambda s: True)
        resource.prlimit(mon.pid, resource.RLIMIT_FSIZE, (4096, hard))  # the disk is full
        with ReplayThread(data, frames_ep, videos=["0001"], skip=gaps) as replay:
            replay.wait(timeout=WAIT)
        full, seen = collect(
            sub, lambda s: s["frames"] + s["dropped"] >= FRAMES and s["journal"]["errors"])
        published = [m.header for m in seen if m.topic == "alarm"]
        assert len(published) >= 3 and full["journal"]["pending"] >= len(published)
        resource.prlimit(mon.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
        freed, _ = collect(sub, lambda s: s["journal"]["pending"] == 0)
    assert freed["errors"] == 0 and freed["journal"]["lost"] == 0 and mon.returncode is None
    assert mon.terminate(timeout=WAIT) == 0
    with Journal(journal, writer=False) as reader:
        rows = reader.alarms()
        verdicts = reader.verdicts()
    assert [r["seq"] for r in rows] == [a["seq"] for a in published]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert [(r["kind"], r["state"], r["frame"]) for r in rows] == [
        (a["kind"], a["state"], a["frame"]) for a in published]
    assert [v["video"] for v in verdicts] == ["0001"]
