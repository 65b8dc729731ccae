"""Soak: 4 streams at 1 kHz into one monitor, resident memory and counters watched.

``LHTSTREAM_SOAK_SECONDS`` (default 30: the short run CI does) sets the length; the
issue's full run is ``LHTSTREAM_SOAK_SECONDS=600 pytest bench/bench_soak.py``. The
monitor runs as a real process (replay -> monitor over ipc, a subscriber reading its
status); its VmRSS is sampled every second. After a warm-up (the first fifth, at least
10 s: pipelines made, calibration done, SQLite's cache filled) resident memory must stay
within `RSS_BAND_MB`, and no counter may grow but frames, alarms and verdicts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pytest
import zmq

SECONDS = float(os.environ.get("LHTSTREAM_SOAK_SECONDS", "30"))
STREAMS = 4
RSS_BAND_MB = 4.0 if SECONDS <= 120 else 8.0
"""Allowed spread of resident memory after warm-up: 'flat within a few MB'."""


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def bench_set(tmp_path_factory):
    from lhtstream.cli.bench import bench_data

    return bench_data(tmp_path_factory.mktemp("soak-cache"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_soak_memory_flat_and_counters_clean(benchmark, bench_set, tmp_path):
    from lhtstream.service.harness import Child, monitor_args, short_tempdir

    data, model = bench_set
    folder = short_tempdir("lht-soak-")
    frames_ep, pub_ep = f"ipc://{folder}/frames", f"ipc://{folder}/out"
    # no --latency-log: its 32 MB array fills page by page and would look like growth
    monitor = Child(monitor_args(frames_ep, pub_ep, model, tmp_path / "journal.sqlite", None,
                                 0.5), "monitor")
    replay = None
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"status/*/")
    samples: list[tuple[float, int]] = []
    statuses: list[dict] = []
    try:
        monitor.wait_for(r"monitor: ready in", 180)
        sub.connect(pub_ep)
        replay = Child(["-m", "lhtstream.cli", "replay", str(data), "--endpoint", frames_ep,
                        "--streams", str(STREAMS), "--loop"], "replay")
        replay.wait_for(r"frame subscriber joined", 60)

        def soak() -> None:
            t0 = time.monotonic()
            next_sample = t0
            while time.monotonic() - t0 < SECONDS:
                if sub.poll(100):
                    statuses.append(msgpack.unpackb(sub.recv_multipart()[1]))
                now = time.monotonic()
                if now >= next_sample:
                    next_sample += 1.0
                    samples.append((now - t0, _rss_kb(monitor.pid)))

        benchmark.pedantic(soak, rounds=1, iterations=1)
    finally:
        if replay is not None:
            replay.stop()
        monitor.stop()
        sub.close(0)
        ctx.term()
    warm = max(10.0, SECONDS / 5)
    after = [kb for t, kb in samples if t >= warm]
    first, last = statuses[0], statuses[-1]
    rss_mb = {"at_warm_up": after[0] / 1024, "min": min(after) / 1024, "max": max(after) / 1024,
              "end": after[-1] / 1024}
    frames = last["frames"] - first["frames"]
    # The worst per-interval latency: seconds here mean the host starved the monitor and
    # frames queued in its SUB socket (up to RCVHWM 10 000 frames, ~14 MB of messages,
    # which the allocator then keeps): bounded, but not the monitor's own growth.
    worst_ms = max((st["latency_us"]["max"] or 0.0) for st in statuses) / 1000
    series = [(round(t), round(kb / 1024, 1)) for t, kb in samples[:: max(1, len(samples) // 40)]]
    benchmark.extra_info.update({"seconds": SECONDS, "streams": STREAMS, "frames": frames,
                                 "rss_mb": {k: round(v, 1) for k, v in rss_mb.items()},
                                 "rss_series_s_mb": series, "worst_latency_ms": worst_ms,
                                 "samples": len(samples)})
    print(f"soak: {STREAMS} streams, {SECONDS:.0f} s, {frames} frames; monitor RSS after "
          f"warm-up {rss_mb['min']:.1f}..{rss_mb['max']:.1f} MB (end {rss_mb['end']:.1f}); "
          f"worst interval latency max {worst_ms:.0f} ms; RSS (s, MB): {series}")
    assert frames >= STREAMS * 1000 * (SECONDS - 2) * 0.9  # it kept up at 1 kHz per stream
    assert rss_mb["max"] - rss_mb["min"] <= RSS_BAND_MB, (
        f"RSS grew {rss_mb['max'] - rss_mb['min']:.1f} MB (band {RSS_BAND_MB} MB); worst "
        f"latency {worst_ms:.0f} ms (seconds: frames queued in the SUB socket); {series}")
    for counter in ("dropped", "malformed", "errors", "reconnects", "refused", "ignored",
                    "evicted"):
        assert last[counter] == first[counter] == 0, (counter, last[counter])
    assert last["streams"] == STREAMS
    assert last["journal"]["errors"] == 0 and last["journal"]["pending"] == 0
