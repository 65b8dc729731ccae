"""Fixtures for the micro-benchmarks: simulated frames and models, built once per session.

Everything comes from the simulator with fixed seeds, so two runs time the same work.
``LHTSTREAM_BENCH_QUICK=1`` (set by ``lhtstream bench --quick``) lowers the rounds.

Besides the 1 ms budget, every budgeted benchmark is compared with a fixed numpy
workload timed in the same run (`reference_workload`, just before and just after it):
their CPU-time ratio is nearly machine- and load-independent, so a step that became
several times slower fails even while it is still far inside the budget.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

QUICK = os.environ.get("LHTSTREAM_BENCH_QUICK", "0") == "1"
ROUNDS = 2_000 if QUICK else 20_000
"""Timed frames per micro-benchmark (one call per round)."""
BUDGET_US = 1000.0
TYPE = 20  # one obstacle window: exercises the obstacle path too
FRAMES = 3000


REFERENCE_RATIOS: dict[str, float] = {
    # CPU-time p50 of the benchmark / of `reference_workload`, as measured on main
    # (2-core VM, numpy 2.x, numba 0.6x; the ratio moved < 5 % between an idle machine and
    # one at load 12). Update a value when a change makes the step faster (or, with a
    # reason, slower): a stale, too high value lets a real regression pass.
    "test_feature_push": 0.36,
    "test_pipeline_process": 0.42,
    "test_monitor_step": 0.90,
}
RATIO_TOLERANCE = 3.0
"""A benchmark fails when its ratio exceeds the stored one by this factor: above the
noise between machines and loads, below the 10x regression it must catch."""
REFERENCE_CALLS = 3_000

_rng = np.random.default_rng(20240501)
_REF_FRAMES = _rng.integers(0, 300, size=(64, 16, 22)).astype(np.uint16)
_REF_WEIGHTS = _rng.normal(size=(16, 22))
_REF_MATRIX = _rng.normal(size=(8, 8))


def reference_workload(i: int) -> float:
    """A fixed few-µs numpy job on one frame (threshold, weighted sum, a small product):
    interpreter and numpy call overhead on frame-sized arrays, like our per-frame step."""
    frame = _REF_FRAMES[i & 63].astype(np.float64)
    weight = np.maximum(frame - 10.0, 0.0)
    total = weight.sum()
    x = (weight * _REF_WEIGHTS).sum() / (total + 1.0)
    return float(np.dot(_REF_MATRIX, _REF_MATRIX[0] * x)[0] + frame.max())


def reference_us(calls: int = REFERENCE_CALLS) -> tuple[float, float]:
    """Median thread CPU time and median wall-clock time of `reference_workload`, µs."""
    cpu_clock, wall_clock = time.thread_time_ns, time.perf_counter_ns
    cpu = np.empty(calls, dtype=np.int64)
    wall = np.empty(calls, dtype=np.int64)
    for i in range(calls):
        w = wall_clock()
        c = cpu_clock()
        reference_workload(i)
        cpu[i] = cpu_clock() - c
        wall[i] = wall_clock() - w
    return float(np.median(cpu)) / 1000.0, float(np.median(wall)) / 1000.0


class CpuTimes:
    """Per-call thread CPU time (ns) of the timed function, next to pytest-benchmark's wall
    clock: on a shared machine the wall-clock tail is the scheduler's, the CPU time is the
    work's. Created right before the benchmark runs, it times the reference workload
    first (`record` times it again after)."""

    def __init__(self, capacity: int) -> None:
        self.ns = np.zeros(capacity, dtype=np.int64)
        self.n = 0
        self.reference_before_us = reference_us()

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


def run_timed(benchmark, fn, rounds: int, warmup_rounds: int) -> CpuTimes:
    """Time `fn` (no arguments) twice over: bare under pytest-benchmark's wall clock,
    `rounds` calls after `warmup_rounds`, then `rounds` calls more, each in thread CPU
    time. Two passes because reading a thread's CPU clock is a system call (0.77 µs per
    read measured on the 2-core VM): inside the wall-clock pass its two reads per call
    would add ~1.6 µs to every frame's time."""
    cpu = CpuTimes(rounds)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    timed = cpu.wrap(fn)
    for _ in range(rounds):
        timed()
    return cpu


def record(benchmark, cpu: CpuTimes, budget_us: float | None = BUDGET_US) -> dict[str, float]:
    """p50/p99 in µs (wall clock and thread CPU time) and the reference ratio into
    ``extra_info``.

    With a budget: asserts it on the wall-clock p50 and the CPU-time p99 (the frame's
    work), and the CPU-time p50 over `reference_workload`'s against `REFERENCE_RATIOS`.
    """
    wall = np.asarray(benchmark.stats.stats.data, dtype=np.float64) * 1e6
    p50, p99 = np.percentile(wall, (50.0, 99.0))
    c50, c99 = np.percentile(cpu.micros(), (50.0, 99.0))
    after = reference_us()
    ref_cpu = 0.5 * (cpu.reference_before_us[0] + after[0])
    ref_wall = 0.5 * (cpu.reference_before_us[1] + after[1])
    ratio, wall_ratio = float(c50) / ref_cpu, float(p50) / ref_wall
    info = benchmark.extra_info
    info["p50_us"], info["p99_us"] = round(float(p50), 2), round(float(p99), 2)
    info["cpu_p50_us"], info["cpu_p99_us"] = round(float(c50), 2), round(float(c99), 2)
    info["reference_cpu_us"], info["reference_ratio"] = round(ref_cpu, 3), round(ratio, 3)
    info["reference_wall_us"], info["reference_wall_ratio"] = (round(ref_wall, 3),
                                                               round(wall_ratio, 3))
    if budget_us is not None:
        assert p50 < budget_us, f"median {p50:.1f} us per frame is over {budget_us:.0f} us"
        assert c99 < budget_us, f"CPU p99 {c99:.1f} us per frame is over {budget_us:.0f} us"
        # CPU time for work that got slower, wall clock for time spent waiting
        check_reference_ratio(benchmark.name, ratio, "CPU", float(c50), ref_cpu)
        check_reference_ratio(benchmark.name, wall_ratio, "wall-clock", float(p50), ref_wall)
    return {"p50": float(p50), "p99": float(p99), "cpu_p50": float(c50), "cpu_p99": float(c99),
            "reference_ratio": ratio}


def check_reference_ratio(name: str, ratio: float, clock: str, step_us: float,
                          reference: float) -> None:
    """Fail when the step got RATIO_TOLERANCE times slower than the stored ratio says."""
    stored = REFERENCE_RATIOS.get(name)
    measured = (f"{clock} median {step_us:.2f} us per frame = {ratio:.3f} x the reference "
                f"workload's {reference:.2f} us, measured in this run")
    assert stored is not None, (
        f"{name}: no reference ratio; add REFERENCE_RATIOS[{name!r}] = {ratio:.2f} to "
        f"bench/conftest.py ({measured})")
    assert ratio <= RATIO_TOLERANCE * stored, (
        f"{name}: {measured}; stored ratio {stored:.3f}: {ratio / stored:.1f}x slower")
    if ratio < stored / RATIO_TOLERANCE:
        warnings.warn(f"{name}: {measured}, {stored / ratio:.1f}x faster than the stored "
                      f"{stored:.3f}: lower REFERENCE_RATIOS[{name!r}] so that a regression "
                      "back to the old speed fails", stacklevel=2)


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
