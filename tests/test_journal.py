"""The SQLite alarm journal: seq continuity, durability against SIGKILL, the history CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lhtstream.cli import main
from lhtstream.io.journal import Journal, JournalError


def alarm(stream: str = "ws1", frame: int = 10, kind: str = "trajectory", **extra) -> dict:
    fields = dict(
        v=1, stream=stream, video="0007", type=3, frame=frame, t_frame_ns=1_000 + frame,
        t_alarm_ns=2_000 + frame, kind=kind, state="raise", score=4.5, threshold=3.0,
        features={"x": 10.25, "y": 3.5, "intensity": float("nan")},
    )  # fmt: skip
    fields.update(extra)
    return fields


def test_seq_is_gapless_and_continues_after_reopen(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        assert j.next_seq() == 1
        assert [j.append_alarm(alarm(frame=f)) for f in range(3)] == [1, 2, 3]
    with Journal(path) as j:
        assert j.next_seq() == 4
        assert j.append_alarm(alarm(frame=99)) == 4
        rows = j.alarms()
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    assert [r["frame"] for r in rows] == [0, 1, 2, 99]
    first = rows[0]
    assert first["kind"] == "trajectory" and first["state"] == "raise"
    assert first["t_frame_ns"] == 1_000 and first["t_alarm_ns"] == 2_000
    # features round-trip as a map; NaN becomes null because JSON has no NaN
    assert first["features"] == {"x": 10.25, "y": 3.5, "intensity": None}


def test_filters_by_seq_stream_and_time(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        j.append_alarm(alarm(stream="a"))
        j.append_alarm(alarm(stream="b"))
        j.append_alarm(alarm(stream="a"))
        assert [r["seq"] for r in j.alarms(since=1)] == [2, 3]
        assert [r["seq"] for r in j.alarms(since="1", stream="a")] == [3]
        assert len(j.alarms(since="2000-01-01T00:00:00")) == 3
        assert j.alarms(since="2999-01-01T00:00:00+00:00") == []
        with pytest.raises(JournalError, match="--since"):
            j.alarms(since="yesterday")


def test_verdicts_are_journaled(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        j.append_verdict(
            dict(
                v=1,
                stream="s",
                video="0001",
                type=2,
                frames=500,
                score=0.7,
                anomalous=True,
                alarms=3,
                t_ns=5,
            )
        )
        (v,) = j.verdicts()
    assert (v["video"], v["frames"], v["anomalous"], v["alarms"], v["score"]) == (
        "0001",
        500,
        True,
        3,
        0.7,
    )


def test_second_writer_is_refused_but_reader_is_not(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        j.append_alarm(alarm())
        with pytest.raises(JournalError, match="in use"):
            Journal(path)
        with Journal(path, writer=False) as reader:
            assert len(reader.alarms()) == 1


def test_not_a_journal_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalError, match="bogus.sqlite"):
        Journal(bogus)
    with pytest.raises(JournalError, match="does not exist"):
        Journal(tmp_path / "missing.sqlite", writer=False)


def test_sigkilled_writer_loses_no_committed_alarm(tmp_path):
    """A process killed with SIGKILL right after append_alarm returned keeps every row."""
    path = tmp_path / "j.sqlite"
    script = textwrap.dedent(f"""
        import sys
        from lhtstream.io.journal import Journal
        j = Journal({str(path)!r})
        for i in range(50):
            j.append_alarm(dict(v=1, stream="s", video="v", type=1, frame=i, t_frame_ns=i,
                                t_alarm_ns=i, kind="stall", state="raise", score=1.0,
                                threshold=0.5, features={{}}))
            print(i, flush=True)   # printed only after the commit returned
        sys.stdin.read()           # wait to be killed, with the journal still open
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(50):
            last = proc.stdout.readline()
        assert last.strip() == "49"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Journal(path) as j:  # the lock died with the process
        assert [r["frame"] for r in j.alarms()] == list(range(50))
        assert j.append_alarm(alarm()) == 51


def test_history_cli_json_lines(tmp_path, capsys):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        j.append_alarm(alarm(stream="a", kind="stall"))
        j.append_alarm(alarm(stream="b", kind="sensor"))
    assert main(["alarms", "--history", "--journal", str(path), "--json", "--stream", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert (got["seq"], got["stream"], got["kind"]) == (2, "b", "sensor")
    for field in (
        "v",
        "video",
        "type",
        "frame",
        "t_frame_ns",
        "t_alarm_ns",
        "state",
        "score",
        "threshold",
        "features",
    ):
        assert field in got
    assert main(["alarms", "--history", "--journal", str(path)]) == 0
    text = capsys.readouterr().out
    assert "#1" in text and "stall" in text and "#2" in text


def test_history_cli_missing_journal_is_one_line_error(tmp_path, capsys):
    assert main(["alarms", "--history", "--journal", str(tmp_path / "nope.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lhtstream: error:") and "nope.sqlite" in err


def test_live_alarms_cli_prints_published_alarms(tmp_path):
    """`lhtstream alarms` subscribes to alarm/verdict on a PUB endpoint (here: the test's)."""
    import msgpack
    import zmq

    from lhtstream.io.protocol import SCHEMA_VERSION, encode

    endpoint = f"ipc://{tmp_path}/pub"
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lhtstream.cli",
            "alarms",
            "--endpoint",
            endpoint,
            "--json",
            "--count",
            "1",
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        a = alarm(seq=7)
        a["features"] = {"x": 1.0}
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            # PUB drops until the subscriber joined: repeat until it exits after one alarm
            pub.send_multipart([b"status/*/", msgpack.packb({"v": 1})])  # malformed: skipped
            pub.send_multipart(encode("alarm", dict(a, v=SCHEMA_VERSION)))
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close(0)
    assert proc.returncode == 0
    first = json.loads(out.splitlines()[0])
    assert first["topic"] == "alarm" and first["seq"] == 7 and first["kind"] == "trajectory"


def test_history_counts_raises_per_bucket_stream_and_kind(tmp_path, monkeypatch):
    path = tmp_path / "j.sqlite"
    clock = iter([1000.0, 1000.5, 1003.0, 1012.0, 1012.5, 1013.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    with Journal(path) as j:
        j.append_alarm(alarm(stream="a", kind="stall"))  # 1000.0
        j.append_alarm(alarm(stream="a", kind="stall", state="clear"))  # 1000.5: not a raise
        j.append_alarm(alarm(stream="a", kind="stall"))  # 1003.0
        j.append_alarm(alarm(stream="b", kind="sensor"))  # 1012.0
        j.append_verdict(dict(v=1, stream="a", video="0007", type=3, frames=10, score=2.0,
                              anomalous=True, alarms=2, t_ns=5))  # 1012.5
        j.append_verdict(dict(v=1, stream="a", video="0008", type=3, frames=10, score=0.1,
                              anomalous=False, alarms=0, t_ns=6))  # 1013.0
    with Journal(path, writer=False) as j:
        bucket, rows = j.raise_counts(max_buckets=5)  # 12 s span: 1 s buckets would be 12
        assert bucket == 10.0
        assert rows == [(1000.0, "a", "stall", 2), (1010.0, "b", "sensor", 1)]
        assert j.raise_counts(max_buckets=20)[1][0] == (1000.0, "a", "stall", 1)
        assert j.verdict_counts(bucket) == [(1010.0, "a", False, 1), (1010.0, "a", True, 1)]


def _verdict(k: int) -> dict:
    return {"v": 2, "stream": "ws1", "video": f"v{k}", "type": 1, "frames": 1, "score": 0.5,
            "anomalous": False, "alarms": 0, "kinds": ["x" * 40] * 20, "t_ns": 1}


def test_wal_stays_bounded_under_a_flood_of_commits(tmp_path):
    """Issue 20 item 2: one commit per row at full speed grew the WAL to 1.24 GB, folded
    back only at shutdown. The checkpoint thread now checkpoints on size (TRUNCATE past
    WAL_MAX_BYTES), so the WAL stays bounded however fast rows come."""
    from lhtstream.io.journal import WAL_MAX_BYTES

    path = tmp_path / "j.sqlite"
    wal = tmp_path / "j.sqlite-wal"
    peak = rows = 0
    with Journal(path) as j:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:
            for _ in range(50):  # one transaction per row, as the monitor commits
                j.record(alarms=[alarm(frame=rows)], verdicts=[_verdict(rows)],
                         opened={"stream": "ws1", "video": f"v{rows + 1}", "type": 1})
                rows += 1
            peak = max(peak, wal.stat().st_size)
        assert j.health()["errors"] == 0 and j.checkpoints > 0
    print(f"{rows} commits in 4 s; WAL peak {peak / 2**20:.1f} MiB (bound "
          f"{WAL_MAX_BYTES / 2**20:.0f} MiB); database {path.stat().st_size / 2**20:.1f} MiB")
    assert peak <= WAL_MAX_BYTES + 8 * 2**20, peak  # + what lands between two looks
    with Journal(path, writer=False) as reader:
        assert len(reader.alarms()) == rows


def test_a_deleted_or_replaced_journal_is_written_back_and_seq_continues(tmp_path):
    """Issue 20 item 6: journal files deleted under a running monitor lost its alarms,
    and a restart began again at seq 1. Now `check_file` sees it, writes the whole
    history back from the open database (a foreign file moved aside), and seq goes on."""
    import sqlite3

    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        assert j.check_file() is None
        j.record(alarms=[alarm(frame=f) for f in range(3)], verdicts=[_verdict(0)])
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{path}{suffix}")
        message = j.check_file()
        assert "deleted" in message and "seq continues at 4" in message
        assert j.health()["restored"] == 1
        seqs, committed = j.record(alarms=[alarm(frame=3)])
        assert (seqs, committed) == ([4], True)
        with Journal(path, writer=False) as reader:  # what `alarms --history` reads now
            assert [r["seq"] for r in reader.alarms()] == [1, 2, 3, 4]
        # replaced by another database: moved aside, the history written back
        os.unlink(path)
        stranger = sqlite3.connect(path)
        stranger.execute("CREATE TABLE t (x)")
        stranger.close()
        message = j.check_file()
        assert "replaced" in message and ".replaced-" in message
        assert j.check_file() is None
        j.record(alarms=[alarm(frame=4)])
    (moved,) = [p for p in tmp_path.glob("j.sqlite.replaced-*") if p.suffix == "" or
                not p.name.endswith(("-wal", "-shm"))]
    assert sqlite3.connect(moved).execute("SELECT name FROM sqlite_master").fetchall() == [
        ("t",)]
    with Journal(path) as j:  # a restart continues the sequence
        assert j.next_seq() == 6
        assert [r["seq"] for r in j.alarms()] == [1, 2, 3, 4, 5]
        assert len(j.verdicts()) == 1
