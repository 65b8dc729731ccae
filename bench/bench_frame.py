"""Per-frame cost of each stage, and of the KDE-AMD baseline on the same frames.

Each benchmark times one frame per round (``benchmark.pedantic``, one call per
round, frames taken in order from a 3000-frame simulated video and wrapping),
records p50/p99 in µs in ``extra_info`` and asserts p99 < 1 ms, the camera's
frame period; the batch one times a whole video per round and reports per frame.
The KDE-AMD ones are reported, not asserted: they are the baseline (the batch
benchmark asserts the ratio, measured side by side).
"""

from __future__ import annotations

import numpy as np
from conftest import QUICK, ROUNDS, TYPE, record, run_timed


def _stepper(n: int):
    """A counter over 0..n-1, wrapping: the frame index of each round."""
    state = [-1]

    def next_index() -> int:
        state[0] = (state[0] + 1) % n
        return state[0]

    return next_index


def test_feature_push(benchmark, live_video, obstacles):
    """Features for one frame: `kernels.step.feature_step` (centroid .. phase, into the ring),
    the compiled call a stream without a model makes per frame."""
    from lhtstream.kernels.features import N_FEATURES, new_track_state
    from lhtstream.kernels.step import STREAM, feature_step

    frames = np.ascontiguousarray(live_video.image, dtype=np.uint16)
    obst = obstacles(live_video).tolist()
    capacity = 4096
    state = np.zeros(STREAM.size)
    STREAM.set(state, threshold=8.0, ring_capacity=capacity)
    track = STREAM.part(state, "track")
    prev = np.zeros(frames[0].size, dtype=np.uint16)
    ring = np.full(2 * capacity * N_FEATURES, np.nan)
    nxt = _stepper(len(frames))

    def push() -> None:
        i = nxt()
        if i == 0:  # a new video, as StreamPipeline.start_video
            track[:] = new_track_state()
            prev[:] = 0
            STREAM.set(state, ring_total=0)
        feature_step(frames[i], obst[i], prev, ring, state)

    for _ in range(len(frames)):  # warm: compiled, and the phase loop locked
        push()
    cpu = run_timed(benchmark, push, ROUNDS, warmup_rounds=100)
    record(benchmark, cpu)


def test_pipeline_process(benchmark, live_video, model, obstacles):
    """`StreamPipeline.process` alone (no decode): one compiled call from pixels through
    features, ring, model score, detector and online update."""
    from lhtstream.service.pipeline import StreamPipeline

    frames = np.ascontiguousarray(live_video.image, dtype=np.uint16)
    obst = obstacles(live_video).tolist()
    pipe = StreamPipeline("ws1", model=model)
    header = {"video": "0001", "type": TYPE, "frame": 0, "t_ns": 0, "obstacle": 0}
    nxt = _stepper(len(frames))

    def step() -> None:
        i = nxt()
        if i == 0:
            pipe.end_video_events()
            pipe.start_video("0001", TYPE, live_video.metadata)
        header["frame"] = i
        header["obstacle"] = obst[i]
        pipe.process(frames[i], header)

    for _ in range(len(frames)):
        step()
    cpu = run_timed(benchmark, step, ROUNDS, warmup_rounds=100)
    record(benchmark, cpu)


KDEAMD_RATIO_GOAL = 100.0
"""Issue 10's goal: per-frame analysis this many times cheaper than KDE-AMD's."""
KDEAMD_RATIO_FLOOR = 50.0
"""What the benchmark asserts (see `test_batch_analysis_vs_kdeamd`)."""


def test_batch_analysis_vs_kdeamd(benchmark, live_video, model, obstacles, kdeamd_realsize,
                                  kdeamd_published_realsize):
    """Per-frame analysis offline, as `evaluate` and the KDE-AMD protocol run it: measured
    rows (spot position, intensity, ...) -> tracker -> score -> detector -> online update,
    one compiled call per block (`StreamPipeline.process_measured`; a round is a whole
    3000-frame video), against KDE-AMD's per-frame work at the real training size
    (`kdeamd_realsize`: one `score_move`, its kernel sum) on the same video, timed side by
    side in this test, both in thread CPU time (a whole-video round on a shared machine
    is preempted; CPU time is the work). Reports the ratio against the 100x goal (issue 10)
    and asserts at least 50x: a margin for the run-to-run noise of two medians (101-129x
    measured after the image evidence of issue 8, 161-207x before it), still failing on our
    analysis getting twice as slow.

    That KDE-AMD is `lhtstream.model.kdeamd`: the kernel sum in numpy, as the published
    code evaluates a frame. Also reported, not asserted: the mean per frame of
    `kdeamd_published` (the published computation re-implemented in Numba, so faster
    than the published code; most frames there find no KDE and cost only a lookup).
    """
    import time

    from lhtstream.kernels.features import measure_video
    from lhtstream.model.kdeamd import centre_positions, spot_positions
    from lhtstream.service.pipeline import StreamPipeline, offline_header

    frames = np.ascontiguousarray(live_video.image, dtype=np.uint16)
    obst = obstacles(live_video)
    meas = measure_video(frames)
    n = len(meas)
    pipe = StreamPipeline("ws1", model=model)
    header = offline_header("ws1", "0001", TYPE)

    def video() -> None:
        pipe.start_video("0001", TYPE)
        pipe.process_measured(meas, obst, header)
        pipe.end_video_events()

    rounds = 30 if QUICK else 200
    cpu = run_timed(benchmark, video, rounds, warmup_rounds=2)
    wall = np.asarray(benchmark.stats.stats.data, dtype=np.float64) * 1e6 / n
    ours = float(np.percentile(wall, 50))
    ours_cpu = float(np.percentile(cpu.micros() / n, 50))

    kde = kdeamd_realsize
    pos = centre_positions(spot_positions(live_video.image), kde.centre)
    moves = 100 if QUICK else 500
    cost = np.empty(moves)
    for i in range(moves):
        t0 = time.thread_time_ns()
        kde.score_move(pos[i, 0], pos[i, 1], pos[i + 1, 0], pos[i + 1, 1], int(obst[i]))
        cost[i] = (time.thread_time_ns() - t0) / 1000.0
    theirs = float(np.median(cost))
    ratio = theirs / ours_cpu

    from lhtstream.model.kdeamd_published import (
        centre_published,
        published_positions,
        scoring_windows,
    )

    pub = kdeamd_published_realsize
    cpos = centre_published(published_positions(live_video.image))
    win = scoring_windows(obst).tolist()
    t0 = time.thread_time_ns()
    for i in range(len(win)):
        pub.score_move(cpos[i, 0], cpos[i, 1], cpos[i + 1, 0], cpos[i + 1, 1], win[i])
    published = (time.thread_time_ns() - t0) / 1000.0 / len(win)
    info = benchmark.extra_info
    info["p50_us"], info["cpu_p50_us"] = round(ours, 3), round(ours_cpu, 3)
    info["p99_us"] = round(float(np.percentile(wall, 99)), 3)
    info["cpu_p99_us"] = round(float(np.percentile(cpu.micros() / n, 99)), 3)
    info["frames_per_round"] = n
    info["kdeamd_us"] = round(theirs, 2)
    info["kdeamd_ratio"] = round(ratio, 1)
    info["kdeamd_published_us"] = round(published, 2)
    info["kdeamd_published_ratio"] = round(published / ours_cpu, 1)
    info["kdeamd_goal"] = KDEAMD_RATIO_GOAL
    info["kdeamd_goal_met"] = ratio >= KDEAMD_RATIO_GOAL
    assert ours < 1000.0
    assert ratio >= KDEAMD_RATIO_FLOOR, (
        f"per-frame analysis {ours_cpu:.2f} us (CPU) is only {ratio:.0f}x cheaper than "
        f"KDE-AMD ({theirs:.1f} us per frame at the real training size); the goal is "
        f"{KDEAMD_RATIO_GOAL:.0f}x, the floor {KDEAMD_RATIO_FLOOR:.0f}x")


def test_monitor_step(benchmark, live_video, model, obstacles):
    """The monitor's whole per-frame step for a frame with nothing queued behind it:
    protocol.decode of the wire parts, the pixels into the stream's `FrameBlock` (a block
    of one), then its step: `StreamPipeline.process` (features, ring, model, detector).
    Sockets excluded."""
    from lhtstream.io.protocol import FrameEncoder, decode
    from lhtstream.service.pipeline import StreamPipeline
    from lhtstream.service.streams import FrameBlock

    frames = np.ascontiguousarray(live_video.image, dtype="<u2")
    obst = obstacles(live_video).tolist()
    enc = FrameEncoder("ws1")
    # bytes, as recv_multipart(copy=True) hands them to the monitor
    wire = [[bytes(p) for p in enc.encode(frames[i], video="0001", type=TYPE, seq=i, index=i,
                                          t_ns=0, obstacle=obst[i])]
            for i in range(len(frames))]
    pipe = StreamPipeline("ws1", model=model)
    pipe.start_video("0001", TYPE, live_video.metadata)
    block = FrameBlock()  # as the monitor takes a lone frame off the wire
    nxt = _stepper(len(wire))

    def step() -> None:
        i = nxt()
        if i == 0:
            pipe.end_video_events()
            pipe.start_video("0001", TYPE, live_video.metadata)
        message = decode(wire[i])
        block.start(message.header, message.payload, 0)
        block.step(pipe)

    for _ in range(len(wire)):
        step()
    cpu = run_timed(benchmark, step, ROUNDS, warmup_rounds=100)
    record(benchmark, cpu)


def test_kdeamd_frame(benchmark, live_video, kdeamd, obstacles, training_videos):
    """KDE-AMD's per-frame work on the same video: `KdeAmd.score_move`, the kernel sum
    over the training points of the move's start cell (R = C = 35, lambda = 15)."""
    from lhtstream.model.kdeamd import centre_positions, spot_positions

    pos = centre_positions(spot_positions(live_video.image), kdeamd.centre)
    win = obstacles(live_video)
    n = len(pos) - 1
    nxt = _stepper(n)

    def move() -> None:
        i = nxt()
        kdeamd.score_move(pos[i, 0], pos[i, 1], pos[i + 1, 0], pos[i + 1, 1], int(win[i]))

    rounds = max(ROUNDS // 4, 500)  # it is slow; fewer rounds keep this under ~10 s
    cpu = run_timed(benchmark, move, rounds, warmup_rounds=20)
    cells = kdeamd.cell_sizes()
    benchmark.extra_info["training_frames"] = int(sum(len(v.image) for v in training_videos))
    benchmark.extra_info["cell_points_median"] = float(np.median(cells)) if cells.size else 0.0
    benchmark.extra_info["quick"] = QUICK
    record(benchmark, cpu, budget_us=None)


def test_kdeamd_frame_realsize(benchmark, live_video, kdeamd_realsize, obstacles):
    """As `test_kdeamd_frame`, with cells as full as on the real data (~1.65 M training
    moves per type; see the `kdeamd_realsize` fixture). This is the fair baseline cost."""
    from lhtstream.model.kdeamd import centre_positions, spot_positions

    model = kdeamd_realsize
    pos = centre_positions(spot_positions(live_video.image), model.centre)
    win = obstacles(live_video)
    nxt = _stepper(len(pos) - 1)

    def move() -> None:
        i = nxt()
        model.score_move(pos[i, 0], pos[i, 1], pos[i + 1, 0], pos[i + 1, 1], int(win[i]))

    rounds = 300 if QUICK else 1_500
    cpu = run_timed(benchmark, move, rounds, warmup_rounds=10)
    cells = model.cell_sizes()
    benchmark.extra_info["cell_points_median"] = float(np.median(cells)) if cells.size else 0.0
    record(benchmark, cpu, budget_us=None)


def test_kdeamd_published_frame_realsize(benchmark, live_video, kdeamd_published_realsize,
                                         obstacles):
    """KDE-AMD as published (the default baseline), one frame at the real training size:
    `PublishedKdeAmd.score_move`, its transposed cell lookup and, when that finds a KDE,
    the kernel sum over the cell's points. Most frames find none (see extra_info), so the
    median is the lookup; the hit frames' cost is measured in the same run."""
    from lhtstream.model.kdeamd_published import (
        centre_published,
        measure_frame_cost,
        published_positions,
        scoring_windows,
    )

    model = kdeamd_published_realsize
    pos = centre_published(published_positions(live_video.image))
    states = obstacles(live_video)
    win = scoring_windows(states).tolist()
    xs, ys = pos[:, 0].tolist(), pos[:, 1].tolist()
    nxt = _stepper(len(win))
    score = model.score_move

    def move() -> None:
        i = nxt()
        score(xs[i], ys[i], xs[i + 1], ys[i + 1], win[i])

    rounds = 2_000 if QUICK else 20_000
    cpu = run_timed(benchmark, move, rounds, warmup_rounds=100)
    cost = measure_frame_cost(model, pos, states, max_moves=len(win))
    info = benchmark.extra_info
    info["hit_fraction"] = round(cost["hit_fraction"], 4)
    info["hit_p50_us"] = round(cost["hit_median_us"], 2)
    info["mean_us"] = round(cost["mean_us"], 2)
    info["hit_points_median"] = cost["points_median"]
    info["cell_points_median"] = float(np.median(model.cell_sizes()))
    record(benchmark, cpu, budget_us=None)
    # the fixture must give real-size cells, else this times only empty lookups
    assert cost["hit_fraction"] > 0.01 and cost["points_median"] > 1000, cost


def test_frames_during_self_calibration_fit(benchmark, model, obstacles):
    """A self-calibrating stream at 1 kHz: the frames that arrive while its fit runs (on a
    thread, issue 10 item 6) against the same number of frames once it scores, paced at
    1 ms (so each frame meets cold caches, as live). Asserts the per-frame handling p99
    stays under the 1 ms budget while fitting."""
    import time

    from lhtstream.io.simulate import simulate_video
    from lhtstream.service.pipeline import DEFAULT_CALIBRATION_FRAMES, FIT_FRAMES, StreamPipeline

    calib = DEFAULT_CALIBRATION_FRAMES
    sim = simulate_video(TYPE, 9002, calib + 2 * FIT_FRAMES)
    frames = np.ascontiguousarray(sim.image, dtype=np.uint16)
    obst = obstacles(sim).tolist()

    def paced(pipe, header, start, stop) -> np.ndarray:
        us = np.empty(stop - start)
        due = time.perf_counter_ns()
        for i in range(start, stop):
            due += 1_000_000
            while time.perf_counter_ns() < due:
                time.sleep(0.0002)
            header["frame"], header["obstacle"] = i, obst[i]
            t0 = time.perf_counter_ns()
            pipe.process(frames[i], header)
            us[i - start] = (time.perf_counter_ns() - t0) / 1000.0
        return us

    warm = StreamPipeline("warm", model)  # compiled (as the monitor's warm-up does)
    warm.process_block(frames[:300], np.array(obst[:300]), {"video": "w", "type": TYPE})

    def run() -> tuple[np.ndarray, np.ndarray, dict]:
        pipe = StreamPipeline("ws1", None, calibration_frames=calib)
        header = {"video": "0001", "type": TYPE, "frame": 0, "t_ns": 0, "obstacle": 0}
        pipe.start_video("0001", TYPE)
        for i in range(calib - 1):  # collect, unpaced
            header["frame"], header["obstacle"] = i, obst[i]
            pipe.process(frames[i], header)
        fitting = paced(pipe, header, calib - 1, calib + FIT_FRAMES - 1)
        status = pipe.status()
        scoring = paced(pipe, header, calib + FIT_FRAMES - 1, len(frames))
        return fitting, scoring, status

    fitting, scoring, status = benchmark.pedantic(run, rounds=1, iterations=1)
    assert status["mode"] == "calibrating" and not status["fitting"]  # the fit was done in time
    p = {name: np.percentile(v, (50, 99)) for name, v in (("fit", fitting), ("score", scoring))}
    info = benchmark.extra_info
    info["p50_us"], info["p99_us"] = round(float(p["fit"][0]), 2), round(float(p["fit"][1]), 2)
    info["max_us"] = round(float(fitting.max()), 1)
    info["scoring_p50_us"], info["scoring_p99_us"] = (round(float(p["score"][0]), 2),
                                                      round(float(p["score"][1]), 2))
    info["scoring_max_us"] = round(float(scoring.max()), 1)
    assert p["fit"][1] < 1000.0, f"p99 {p['fit'][1]:.0f} us per frame while the fit ran"
