"""Fixtures for the micro-benchmarks: simulated frames and models, built once per session.

Everything comes from the simulator with fixed seeds, so two runs time the same work.
``LHTSTREAM_BENCH_QUICK=1`` (set by ``lhtstream bench --quick``) lowers the rounds.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

QUICK = os.environ.get("LHTSTREAM_BENCH_QUICK", "0") == "1"
ROUNDS = 2_000 if QUICK else 20_000
"""Timed frames per micro-benchmark (one call per round)."""
BUDGET_US = 1000.0
TYPE = 20  # one obstacle window: exercises the obstacle path too
FRAMES = 3000


class CpuTimes:
    """Per-call thread CPU time (ns) of the timed function, next to pytest-benchmark's wall
    clock: on a shared machine the wall-clock tail is the scheduler's, the CPU time is the
    work's."""

    def __init__(self, capacity: int) -> None:
        self.ns = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    def wrap(self, fn):
        clock = time.thread_time_ns
        ns = self.ns
        cap = ns.shape[0]

        def timed() -> None:
            t = clock()
            fn()
            ns[self.n % cap] = clock() - t
            self.n += 1

        return timed

    def micros(self) -> np.ndarray:
        return self.ns[: min(self.n, self.ns.shape[0])] / 1000.0


def record(benchmark, cpu: CpuTimes, budget_us: float | None = BUDGET_US) -> dict[str, float]:
    """p50/p99 in µs (wall clock and thread CPU time) into ``extra_info``.

    Asserts the budget on the wall-clock p50 and the CPU-time p99 (the frame's work).
    """
    wall = np.asarray(benchmark.stats.stats.data, dtype=np.float64) * 1e6
    p50, p99 = np.percentile(wall, (50.0, 99.0))
    c50, c99 = np.percentile(cpu.micros(), (50.0, 99.0))
    info = benchmark.extra_info
    info["p50_us"], info["p99_us"] = round(float(p50), 2), round(float(p99), 2)
    info["cpu_p50_us"], info["cpu_p99_us"] = round(float(c50), 2), round(float(c99), 2)
    if budget_us is not None:
        assert p50 < budget_us, f"median {p50:.1f} us per frame is over {budget_us:.0f} us"
        assert c99 < budget_us, f"CPU p99 {c99:.1f} us per frame is over {budget_us:.0f} us"
    return {"p50": float(p50), "p99": float(p99), "cpu_p50": float(c50), "cpu_p99": float(c99)}


@pytest.fixture(scope="session")
def live_video():
    """A normal simulated video the benchmarks stream (not in any training set)."""
    from lhtstream.io.simulate import simulate_video

    return simulate_video(TYPE, 9001, FRAMES)


@pytest.fixture(scope="session")
def training_videos():
    """Normal videos of the same type for fitting (fixed seeds)."""
    from lhtstream.io.simulate import simulate_video

    return [simulate_video(TYPE, 100 + i, FRAMES) for i in range(6 if QUICK else 12)]


@pytest.fixture(scope="session")
def model(training_videos):
    """Our normality model, fitted and calibrated on the training videos."""
    from lhtstream.kernels.features import video_features
    from lhtstream.model.detector import calibrate
    from lhtstream.model.normality import NormalityModel

    rows = [(TYPE, video_features(np.ascontiguousarray(v.image, dtype=np.uint16),
                                  _obstacles(v))) for v in training_videos]
    m = NormalityModel.fit(rows[:-2])
    calibrate(m, rows[-2:])
    return m


@pytest.fixture(scope="session")
def kdeamd(training_videos):
    """KDE-AMD with the published best settings (R = C = 35, lambda = 15)."""
    from lhtstream.model.kdeamd import KdeAmd, spot_positions

    return KdeAmd(rows=35, cols=35, lam=15).fit(
        [spot_positions(v.image) for v in training_videos],
        [_obstacles(v) for v in training_videos],
    )


def _obstacles(video) -> np.ndarray:
    """Obstacle state 0/1/2 per frame from the video's metadata key frames."""
    from lhtstream.io.dataset import obstacle_states

    return obstacle_states(video.metadata).astype(np.int64)


@pytest.fixture(scope="session")
def obstacles():
    return _obstacles


REAL_TRAINING_FRAMES = 110 * 15_000
"""Frames KDE-AMD trains on per type on the real data (leave-one-out of ~110 videos)."""


@pytest.fixture(scope="session")
def kdeamd_realsize(training_videos):
    """KDE-AMD whose cells hold as many points as on the real data set.

    A kernel sum costs in proportion to the points of the start cell, and the real
    training set per type is ~45x our simulated one. Simulating it would take
    minutes, so the simulated training positions are replicated (each copy with
    0.05 px jitter) up to the real size: the same geometry, the real point counts.
    Only timing uses this model (its reference histogram is built on few moves).
    """
    from lhtstream.model.kdeamd import KdeAmd, spot_positions

    rep_pos, rep_obs = _real_size([spot_positions(v.image) for v in training_videos],
                                  [_obstacles(v) for v in training_videos])
    return KdeAmd(rows=35, cols=35, lam=15, reference_moves=2_000).fit(rep_pos, rep_obs)


def _real_size(pos: list[np.ndarray], obs: list[np.ndarray]
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training positions (px) replicated, each copy with 0.05 px jitter, up to
    `REAL_TRAINING_FRAMES` frames; the obstacle states alongside."""
    copies = max(1, -(-REAL_TRAINING_FRAMES // sum(len(p) for p in pos)))
    rng = np.random.default_rng(5)
    rep_pos, rep_obs = [], []
    for _ in range(copies):
        for p, o in zip(pos, obs, strict=True):
            rep_pos.append(p + rng.normal(0.0, 0.05, size=p.shape))
            rep_obs.append(o)
    return rep_pos, rep_obs


@pytest.fixture(scope="session")
def kdeamd_published_realsize(training_videos):
    """KDE-AMD as published (the default baseline) with as many training moves as on the
    real data set: the simulated training videos, centred as published, replicated with
    0.05 px jitter up to `REAL_TRAINING_FRAMES` (as `kdeamd_realsize` does)."""
    from lhtstream.model.kdeamd_published import (
        PublishedKdeAmd,
        centre_published,
        published_positions,
    )

    return PublishedKdeAmd().fit(*_real_size(
        [centre_published(published_positions(v.image)) for v in training_videos],
        [_obstacles(v) for v in training_videos]))
