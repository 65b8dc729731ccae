"""A plant of many workstations (issue 11, item 5): streams split over monitors by ZeroMQ's
own prefix filtering, alarms fanned in from every monitor, journals merged by time."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from lhtstream.cli.parser import main
from lhtstream.io import protocol
from lhtstream.io.journal import Journal
from tests.processes import Subscriber, tcp_endpoint

FRAMES = 1000  # per video, 2 videos per stream: 2 s at 1 kHz
PER_LINE = 8  # workstations per production line (one replay each), 2 lines: 16 streams


@pytest.fixture(scope="module")
def data(dataset_factory) -> Path:
    return dataset_factory(types=[1], videos_per_type=2, frames=FRAMES, seed=31)


def _statuses(sub: Subscriber, want: int, timeout: float = 60.0) -> dict[str, dict]:
    """Latest status per (monitor's) stream until every monitor-wide status saw ``want``
    frames handled or lost."""
    latest: dict[str, dict] = {}
    whole: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    done_at = None
    while time.monotonic() < deadline:
        if done_at is not None and time.monotonic() > done_at + 1.0:  # streams' statuses
            return {**latest, **{f"*{k}": w for k, w in whole.items()}}
        try:
            msg = protocol.decode(sub.recv(timeout=0.2))
        except TimeoutError:
            continue
        h = msg.header
        if h["stream"] == "*":
            whole[h["max_streams"]] = h  # the two monitors differ in --max-streams
            p99 = h["latency_us"]["p99"]
            if p99 is not None:
                worst = latest.setdefault(f"p99 *{h['max_streams']}", {"us": 0.0})
                worst["us"] = max(worst["us"], p99)
            if done_at is None and len(whole) == 2 and all(
                    w["frames"] + w["dropped"] >= want for w in whole.values()):
                done_at = time.monotonic()
        else:
            latest[h["stream"]] = h
    raise AssertionError(f"monitors did not finish within {timeout} s: {whole}")


def test_sixteen_streams_split_across_two_monitors_nothing_lost(procs, data, tmp_path):
    """Two lines of 8 workstations (two replays, streams line1-ws1.. and line2-ws1..), two
    monitors each connected to both replays and taking one line by pattern: every frame
    of every stream is handled by exactly the monitor whose pattern takes it, none is
    lost, ZeroMQ filters the other line out (nothing `ignored` in Python), and one
    `lhtstream alarms` connected to both monitors gets every verdict."""
    line_eps = [tcp_endpoint(), tcp_endpoint()]
    mon_eps = [tcp_endpoint(), tcp_endpoint()]
    monitors = []
    for i, (pattern, max_streams) in enumerate([("line1-*", 10), ("line2-*", 11)]):
        mon = procs.cli("monitor", "--frames", line_eps[0], "--frames", line_eps[1],
                        "--publish", mon_eps[i], "--journal", tmp_path / f"journal{i}.sqlite",
                        "--streams", pattern, "--max-streams", max_streams,
                        "--status-interval", "0.25", "--calibration-seconds", "0.3")
        monitors.append(mon)
    for mon in monitors:
        mon.wait_for_stderr(r"ready in", timeout=180)
    fan_in = procs.cli("alarms", "--endpoint", mon_eps[0], "--endpoint", mon_eps[1], "--json",
                       "--timeout", "120")
    fan_in.wait_for_stderr(r"alarms: listening on", timeout=30)
    with Subscriber(mon_eps[0], ["status"]) as sub:
        sub.socket.connect(mon_eps[1])  # one subscriber, both monitors
        time.sleep(0.5)
        t0 = time.monotonic()
        replays = [procs.cli("replay", data, "--endpoint", line_eps[k], "--streams", PER_LINE,
                             "--stream-prefix", f"line{k + 1}-ws", "--wait-subscribers", "1")
                   for k in range(2)]
        for replay in replays:
            assert replay.wait(timeout=120) == 0, replay.stderr
        sent = [int(re.search(r"(\d+) frames on 8 stream", r.stderr).group(1)) for r in replays]
        seconds = time.monotonic() - t0
        latest = _statuses(sub, PER_LINE * 2 * FRAMES)
    assert sent == [PER_LINE * 2 * FRAMES] * 2
    for k, max_streams in ((0, 10), (1, 11)):
        whole = latest[f"*{max_streams}"]
        assert (whole["frames"], whole["dropped"], whole["malformed"]) == (sent[k], 0, 0)
        assert (whole["streams"], whole["ignored"], whole["refused"]) == (PER_LINE, 0, 0)
        assert whole["selection"] == f"line{k + 1}-*" and whole["errors"] == 0
    for k in range(2):
        for w in range(1, PER_LINE + 1):
            st = latest[f"line{k + 1}-ws{w}"]
            assert (st["frames"], st["dropped"], st["videos"]) == (2 * FRAMES, 0, 2)
    # fan-in: every verdict of the 16 streams through one subscriber
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        verdicts = [json.loads(line) for line in fan_in.stdout.splitlines()
                    if '"topic":"verdict"' in line]
        if len(verdicts) >= 2 * 2 * PER_LINE:
            break
        time.sleep(0.2)
    assert sorted((v["stream"], v["video"]) for v in verdicts) == sorted(
        (f"line{k}-ws{w}", video) for k in (1, 2) for w in range(1, PER_LINE + 1)
        for video in ("0001", "0002"))
    p99 = [latest.get(f"p99 *{m}", {}).get("us") for m in (10, 11)]
    print(f"plant: 16 streams x {2 * FRAMES} frames in {seconds:.1f} s into 2 monitors, "
          f"0 lost; worst 0.25 s-interval latency p99 per monitor {p99} us")


def test_history_merges_journals_by_time(tmp_path, capsys):
    paths = [tmp_path / "a.sqlite", tmp_path / "b.sqlite"]
    base = dict(v=2, video="0001", type=1, t_frame_ns=1, t_alarm_ns=2, state="raise",
                score=5.0, threshold=4.0, features={})
    with Journal(paths[0]) as a, Journal(paths[1]) as b:
        for i, (journal, stream) in enumerate([(a, "line1-ws1"), (b, "line2-ws1"),
                                                (a, "line1-ws2"), (b, "line2-ws2")]):
            journal.append_alarm(dict(base, stream=stream, frame=i, kind="stall"))
            time.sleep(0.01)  # journaled at distinct times
    main(["alarms", "--history", "--json", "--journal", str(paths[0]), "--journal",
          str(paths[1])])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in rows] == [0, 1, 2, 3]  # interleaved by time, not by file
    assert [r["journal"] for r in rows] == [str(p) for p in paths * 2]
    assert [r["seq"] for r in rows] == [1, 1, 2, 2]  # seqs are per journal
    main(["alarms", "--history", "--json", "--journal", str(paths[0]), "--journal",
          str(paths[1]), "--streams", "line2-*"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["stream"] for r in rows] == ["line2-ws1", "line2-ws2"]
