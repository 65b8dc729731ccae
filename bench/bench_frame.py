"""Per-frame cost of each stage, and of the KDE-AMD baseline on the same frames.

Each benchmark times one frame per round (``benchmark.pedantic``, one call per
round, frames taken in order from a 3000-frame simulated video and wrapping),
records p50/p99 in µs in ``extra_info`` and asserts p99 < 1 ms, the camera's
frame period. The KDE-AMD one is reported, not asserted: it is the baseline.
"""

from __future__ import annotations

import numpy as np
from conftest import QUICK, ROUNDS, TYPE, CpuTimes, record


def _stepper(n: int):
    """A counter over 0..n-1, wrapping: the frame index of each round."""
    state = [-1]

    def next_index() -> int:
        state[0] = (state[0] + 1) % n
        return state[0]

    return next_index


def test_feature_push(benchmark, live_video, obstacles):
    """Features for one frame: `FeatureExtractor.push` (centroid .. phase, into the ring)."""
    from lhtstream.kernels.features import FeatureExtractor

    frames = np.ascontiguousarray(live_video.image, dtype=np.uint16)
    obst = obstacles(live_video).tolist()
    ext = FeatureExtractor()
    nxt = _stepper(len(frames))

    def push() -> None:
        i = nxt()
        if i == 0:
            ext.reset()
        ext.push(frames[i], obst[i])

    for _ in range(len(frames)):  # warm: compiled, and the phase loop locked
        push()
    cpu = CpuTimes(ROUNDS + 100)
    benchmark.pedantic(cpu.wrap(push), rounds=ROUNDS, iterations=1, warmup_rounds=100)
    record(benchmark, cpu)


def test_model_detector(benchmark, live_video, model, obstacles):
    """Model score + online update + detector for one feature row (what follows features)."""
    from lhtstream.kernels.features import video_features
    from lhtstream.model.detector import Detector
    from lhtstream.model.normality import N_GROUPS

    rows = video_features(np.ascontiguousarray(live_video.image, dtype=np.uint16),
                          obstacles(live_video))
    m = model.copy()
    slot = m.slot(TYPE)
    det = Detector.for_model(m, TYPE)
    state, scores, work = m.new_state(), np.zeros(N_GROUPS), np.zeros(32)
    nxt = _stepper(len(rows))

    def step() -> None:
        i = nxt()
        if i == 0:
            state[:] = 0.0
            det.reset()
        row = rows[i]
        scored = m.score_slot(slot, row, state, scores, work)
        det.step(scores, scored)
        if scored and not det.active.any():
            m.learn_slot(slot, row, state, work)

    for _ in range(len(rows)):
        step()
    cpu = CpuTimes(ROUNDS + 100)
    benchmark.pedantic(cpu.wrap(step), rounds=ROUNDS, iterations=1, warmup_rounds=100)
    record(benchmark, cpu)


def test_monitor_step(benchmark, live_video, model, obstacles):
    """The monitor's whole per-frame step: protocol.decode of the wire parts, then
    `StreamPipeline.process` (features, ring, model, detector). Sockets excluded."""
    from lhtstream.io.protocol import FrameEncoder, decode, frame_array
    from lhtstream.service.pipeline import StreamPipeline

    frames = np.ascontiguousarray(live_video.image, dtype="<u2")
    obst = obstacles(live_video).tolist()
    enc = FrameEncoder("ws1")
    # bytes, as recv_multipart(copy=True) hands them to the monitor
    wire = [[bytes(p) for p in enc.encode(frames[i], video="0001", type=TYPE, seq=i, index=i,
                                          t_ns=0, obstacle=obst[i])]
            for i in range(len(frames))]
    pipe = StreamPipeline("ws1", model=model)
    pipe.start_video("0001", TYPE, live_video.metadata)
    nxt = _stepper(len(wire))

    def step() -> None:
        i = nxt()
        if i == 0:
            pipe.end_video_events()
            pipe.start_video("0001", TYPE, live_video.metadata)
        message = decode(wire[i])
        pipe.process(frame_array(message), message.header)

    for _ in range(len(wire)):
        step()
    cpu = CpuTimes(ROUNDS + 100)
    benchmark.pedantic(cpu.wrap(step), rounds=ROUNDS, iterations=1, warmup_rounds=100)
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
    cpu = CpuTimes(rounds + 20)
    benchmark.pedantic(cpu.wrap(move), rounds=rounds, iterations=1, warmup_rounds=20)
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
    cpu = CpuTimes(rounds + 10)
    benchmark.pedantic(cpu.wrap(move), rounds=rounds, iterations=1, warmup_rounds=10)
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
    cpu = CpuTimes(rounds + 100)
    benchmark.pedantic(cpu.wrap(move), rounds=rounds, iterations=1, warmup_rounds=100)
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
