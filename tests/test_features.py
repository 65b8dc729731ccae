"""lhtstream.kernels.features: measurements, tracking, phase, ring buffer, batch == stream."""

from __future__ import annotations

import numpy as np
import pytest

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.dataset import obstacle_states
from lhtstream.kernels import features as F
from lhtstream.service.pipeline import StreamPipeline
from tests.compiled import new_specialisations

T = 10.0  # threshold used by the hand-built frames


class Stream:
    """Frames through the production streaming path: a `StreamPipeline` that has no model
    yet (measure -> track -> ring in one compiled call per frame, as the monitor runs a
    self-calibrating stream); `push` returns the frame's feature row (a copy)."""

    def __init__(self, threshold: float = F.DEFAULT_THRESHOLD, capacity: int = 4096) -> None:
        self.pipe = StreamPipeline("ws1", threshold=threshold, ring_capacity=capacity,
                                   calibration_frames=1000)
        self.video = 0
        self.reset()

    def reset(self) -> None:
        """A new video: the tracker, REPEAT reference and ring start again."""
        self.video += 1
        self.pipe.start_video(str(self.video), 1)

    def push(self, frame: np.ndarray, obstacle: int = 0) -> np.ndarray:
        self.pipe.process(frame, {"video": str(self.video), "type": 1, "obstacle": obstacle})
        return self.pipe.ring.latest(1)[0].copy()


def circular_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between phases on the 10-frame circle, frames."""
    d = np.mod(a - b, 10.0)
    return np.minimum(d, 10.0 - d)


# ------------------------------------------------------------ a small independent generator


def eight_xy(phase, width=12.0, height=4.0, x0=4.0, y0=3.0):
    """Point of the rectangular eight at `phase` (frames, period 10; 0 = centre of top edge)."""
    w, h = width, height
    corners = np.array([
        (x0 + w, y0), (x0, y0), (x0, y0 + h), (x0 + w, y0 + h), (x0 + w, y0 + 2 * h),
        (x0, y0 + 2 * h), (x0, y0 + h), (x0 + w, y0 + h), (x0 + w, y0),
    ])  # segments 1..8: top R->L, down, middle L->R, down, bottom R->L, up, middle L->R, up
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(corners, axis=0), axis=1))])
    s = (np.asarray(phase) / 10.0 * cum[-1] + w / 2) % cum[-1]
    return np.interp(s, cum, corners[:, 0]), np.interp(s, cum, corners[:, 1])


def make_video(n, rates=1.0003, phase0=3.3, shape=(16, 22), noise=3.0, seed=0,
               obstacle_windows=(), sub=5):
    """Gaussian spot on the eight, 1 ms exposures, 1 kHz; returns video, obstacles, truth phase.

    Inside an obstacle window the spot runs a different path (it sweeps the
    middle line), as the real pattern changes shape there, while the scanner
    phase goes on.
    """
    rng = np.random.default_rng(seed)
    rates = np.broadcast_to(np.asarray(rates, dtype=float), (n,))
    phase = phase0 + np.concatenate([[0.0], np.cumsum(rates[:-1])])
    obstacles = np.zeros(n, dtype=np.int8)
    for k, (a, b) in enumerate(obstacle_windows, start=1):
        obstacles[a:b + 1] = k
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5)
    video = np.zeros((n, *shape), dtype=np.uint16)
    for i in range(n):
        p = phase[i] + offsets * rates[i]
        xs, ys = eight_xy(p)
        if obstacles[i]:
            xs = 4.0 + 6.0 * (1.0 - np.cos(2 * np.pi * p / 10.0))
            ys = np.full_like(xs, 7.0)
        img = np.zeros(shape)
        for x, y in zip(xs, ys, strict=True):
            img += 250.0 / sub * np.exp(-((cc - x) ** 2 + (rr - y) ** 2) / (2 * 1.2**2))
        img += rng.normal(0.0, noise, shape)
        video[i] = np.clip(np.rint(img), 0, 1024).astype(np.uint16)
    return video, obstacles, np.mod(phase, 10.0)


@pytest.fixture(scope="module")
def normal_video():
    return make_video(2000, seed=1)


# ------------------------------------------------------------ measure_frame


def measure(frame, previous=None, threshold=T):
    frame = np.asarray(frame, dtype=np.uint16)
    if previous is None:
        previous = np.zeros_like(frame)
    row = np.full(F.N_FEATURES, -7.0)
    F.measure_frame(frame, previous, threshold, row)
    return row


def test_centroid_of_symmetric_blob_at_subpixel_centre():
    # a 2x2 plateau with a symmetric ring: centre (x, y) = (6.5, 4.5) by symmetry
    f = np.zeros((10, 12), dtype=np.uint16)
    f[4:6, 6:8] = 200
    f[3, 6:8] = f[6, 6:8] = 60
    f[4:6, 5] = f[4:6, 8] = 60
    row = measure(f)
    assert row[F.X] == pytest.approx(6.5, abs=1e-12)
    assert row[F.Y] == pytest.approx(4.5, abs=1e-12)
    assert row[F.AREA] == 12
    assert row[F.PEAK] == 200
    assert row[F.INTENSITY] == 4 * 200 + 8 * 60
    assert row[F.EMPTY] == 0.0 and row[F.REPEAT] == 0.0


def test_centroid_weights_are_value_minus_threshold():
    f = np.zeros((5, 5), dtype=np.uint16)
    f[2, 1] = 40  # weight 30
    f[2, 3] = 20  # weight 10
    f[0, 0] = 10  # at the threshold: ignored
    row = measure(f)
    assert row[F.X] == pytest.approx((1 * 30 + 3 * 10) / 40)  # 1.5
    assert row[F.Y] == pytest.approx(2.0)
    assert row[F.AREA] == 2
    assert row[F.INTENSITY] == 60
    assert row[F.PEAK] == 40
    # spread: weighted RMS radius about (1.5, 2): sqrt((30*0.25 + 10*2.25)/40)
    assert row[F.SPREAD] == pytest.approx(np.sqrt(0.75))


def test_threshold_makes_faint_pixels_empty_and_a_pixel_crossing_it_enters_with_small_weight():
    f = np.zeros((5, 5), dtype=np.uint16)
    f[1, 1] = 10
    f[3, 4] = 7
    row = measure(f)
    assert row[F.EMPTY] == 1.0
    assert np.isnan(row[F.X]) and np.isnan(row[F.Y])
    assert row[F.AREA] == 0 and row[F.INTENSITY] == 0
    assert row[F.PEAK] == 10
    f[2, 2] = 110  # weight 100
    base = measure(f)[F.X]
    f[2, 4] = 11  # just above the threshold: weight 1, pulls x by 2/101 px only
    assert measure(f)[F.X] - base == pytest.approx(2.0 / 101.0)


def test_repeat_flags_identical_nonempty_frames_not_empty_ones():
    f1 = np.zeros((4, 6), dtype=np.uint16)
    f1[1, 2] = 90
    f2 = f1.copy()
    f2[2, 3] = 50
    zero = np.zeros_like(f1)
    prev = np.zeros_like(f1)
    flags = []
    for f in (f1, f1, zero, zero, f1, f2, f2.copy(), f1):
        row = measure(f, prev)
        flags.append((row[F.EMPTY], row[F.REPEAT]))
    assert flags == [
        (0, 0), (0, 1),  # frozen camera: same difference frame again
        (1, 0), (1, 0),  # an all-zero frame is EMPTY, never REPEAT
        (0, 1),  # equal to the previous NON-EMPTY frame
        (0, 0), (0, 1), (0, 0),
    ]


# ------------------------------------------------------------ tracking


def test_empty_frames_carry_position_forward_with_zero_velocity():
    ex = Stream(threshold=T)
    f = np.zeros((8, 8), dtype=np.uint16)
    first = ex.push(np.zeros_like(f))  # nothing seen yet
    assert np.isnan(first[F.X]) and first[F.VX] == 0.0 and first[F.EMPTY] == 1.0
    f[2, 3] = 100
    a = ex.push(f)
    b = ex.push(np.zeros_like(f))
    assert (a[F.X], a[F.Y]) == (3.0, 2.0)
    assert b[F.EMPTY] == 1.0
    assert (b[F.X], b[F.Y]) == (3.0, 2.0)
    assert (b[F.VX], b[F.VY]) == (0.0, 0.0)


def test_velocity_is_position_change_per_frame():
    ex = Stream(threshold=T)
    f = np.zeros((8, 8), dtype=np.uint16)
    f[2, 3] = 100
    ex.push(f)
    g = np.zeros_like(f)
    g[5, 1] = g[5, 2] = 100  # centroid (1.5, 5)
    row = ex.push(g)
    assert row[F.VX] == pytest.approx(-1.5)
    assert row[F.VY] == pytest.approx(3.0)
    row = ex.push(np.zeros_like(f))  # empty: carried, so no motion
    assert (row[F.VX], row[F.VY]) == (0.0, 0.0)
    row = ex.push(f)
    assert row[F.VX] == pytest.approx(1.5) and row[F.VY] == pytest.approx(-3.0)


def test_phase_follows_truth_and_rate_on_a_normal_video(normal_video):
    video, obstacles, truth = normal_video
    feats = F.video_features(video, obstacles)
    err = circular_error(feats[100:, F.PHASE], truth[100:])
    assert err.max() < 0.5
    assert np.median(err) < 0.15
    assert np.abs(feats[500:, F.RATE] - 1.0003).max() < 5e-4
    assert ((feats[:, F.PHASE] >= 0) & (feats[:, F.PHASE] < 10)).all()
    assert feats[-1, F.CYCLE] == pytest.approx(2000 * 1.0003 / 10, abs=1.0)
    assert (np.diff(feats[:, F.CYCLE]) >= 0).all()
    assert feats[-1, F.LOCK] > 0.7


def test_phase_keeps_through_obstacle_windows_of_another_shape():
    video, obstacles, truth = make_video(2500, rates=0.9992, seed=2,
                                         obstacle_windows=((600, 1100), (1700, 2000)))
    feats = F.video_features(video, obstacles)
    assert np.array_equal(feats[:, F.OBSTACLE], obstacles)
    err = circular_error(feats[100:, F.PHASE], truth[100:])
    assert err.max() < 0.5
    # the main loop did not learn the changed pattern as the eight: the rate stays right
    assert np.abs(feats[500:, F.RATE] - 0.9992).max() < 1e-3


@pytest.mark.parametrize("type_id", [2, 7, 20])
def test_phase_stays_locked_through_a_long_window_while_the_scanner_clock_wanders(type_id):
    """A 2.4-s obstacle window (real videos have them; 5-s training videos do not): the
    scanner's rate wanders meanwhile, so a loop coasting at its last rate drifts by
    0.5-1.4 frames here; locked to the window's own pattern it stays within 0.2 of where it
    was, and leaves the window with the scanner's rate, not a pull-in transient."""
    from lhtstream.io.simulate import simulate_video

    sim = simulate_video(type_id, 1, 6000, windows=[(1500, 3900)])
    feats = F.video_features(sim.image, obstacle_states(sim.metadata))
    err = (feats[:, F.PHASE] - sim.truth["phase"] + 5.0) % 10.0 - 5.0
    drift = np.abs(err[1520:3900] - np.median(err[1000:1500]))
    assert drift.max() < 0.2
    truth_rate = np.convolve(sim.truth["rate"], np.ones(200) / 200, mode="same")
    assert np.abs(feats[3900:4400, F.RATE] - truth_rate[3900:4400]).max() < 1e-3


def test_phase_relocks_after_a_frequency_step():
    rates = np.where(np.arange(3000) < 1000, 1.0002, 1.03)  # a 3 % scanner frequency jump
    video, obstacles, truth = make_video(3000, rates=rates, seed=3)
    feats = F.video_features(video, obstacles)
    err = circular_error(feats[:, F.PHASE], truth)
    assert err[100:1000].max() < 0.5
    assert err[1600:].max() < 0.3
    assert feats[-1, F.RATE] == pytest.approx(1.03, abs=1e-3)


def test_kdeamd_noise_reruns_the_tracker_on_perturbed_measurements(normal_video):
    video, obstacles, truth = normal_video
    meas = F.measure_video(video)
    assert np.isnan(meas[:, F.PHASE]).all()  # measurements only
    noisy = meas.copy()
    rng = np.random.default_rng(5)
    noisy[:, [F.X, F.Y]] += rng.normal(0.0, np.sqrt(0.02), (len(meas), 2))
    clean = F.track(meas, obstacles)
    pert = F.track(noisy, obstacles)
    assert np.array_equal(clean, F.video_features(video, obstacles), equal_nan=True)
    assert np.array_equal(pert[:, F.X], noisy[:, F.X])  # no empty frames here
    assert np.std(pert[:, F.VX] - clean[:, F.VX]) == pytest.approx(0.2, rel=0.1)
    assert circular_error(pert[100:, F.PHASE], truth[100:]).max() < 0.5
    assert not np.isnan(meas[:, F.X]).any()


# ------------------------------------------------------------ streaming == batch


def test_streaming_equals_batch_to_the_bit():
    video, obstacles, _ = make_video(700, seed=4, obstacle_windows=((300, 400),))
    video[50] = 0  # empty frames
    video[51] = 3
    video[200] = video[199]  # a frozen frame
    video[201] = video[199]
    batch = F.video_features(video, obstacles)
    assert batch[50, F.EMPTY] == 1 and batch[200, F.REPEAT] == 1 and batch[201, F.REPEAT] == 1

    ex = Stream(capacity=256)
    streamed = np.empty_like(batch)
    for i in range(len(video)):
        # frames decoded from the wire are read-only buffers
        frame = np.frombuffer(video[i].tobytes(), dtype=np.uint16).reshape(video.shape[1:])
        streamed[i] = ex.push(frame, int(obstacles[i]))
    assert np.array_equal(streamed, batch, equal_nan=True)
    assert np.array_equal(ex.pipe.ring.latest(256), batch[-256:], equal_nan=True)

    # a new video starts from scratch, like a fresh batch run
    ex.reset()
    assert len(ex.pipe.ring) == 0
    again = np.array([ex.push(video[i], int(obstacles[i])) for i in range(100)])
    assert np.array_equal(again, batch[:100], equal_nan=True)
    assert np.array_equal(F.track(F.measure_video(video), obstacles), batch, equal_nan=True)


def test_bad_input_raises_a_feature_error():
    ex = Stream()
    with pytest.raises(LhtstreamError, match="uint16"):
        ex.push(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(LhtstreamError, match="uint16"):
        F.video_features(np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(LhtstreamError, match="obstacle"):
        F.video_features(np.zeros((3, 4, 4), dtype=np.uint16), np.zeros(5, dtype=np.int8))


# ------------------------------------------------------------ ring buffer


def test_ring_buffer_wraps_and_latest_is_a_view_of_the_last_pushes():
    ring = F.RingBuffer(5, 3)
    assert len(ring) == 0 and ring.latest(0).shape == (0, 3)
    pushed = []
    for k in range(13):
        row = np.array([k, 10 * k, -k], dtype=float)
        ring.push(row)
        pushed.append(row)
        for n in range(len(ring) + 1):
            view = ring.latest(n)
            assert np.array_equal(view, np.array(pushed[len(pushed) - n:]).reshape(n, 3))
    assert len(ring) == 5 and ring.total == 13
    view = ring.latest(4)
    assert np.shares_memory(view, ring.buffer)
    assert view.flags.c_contiguous
    with pytest.raises(LhtstreamError):
        ring.latest(6)


def test_warm_up_leaves_nothing_to_compile_for_frames_off_the_wire():
    # the monitor calls warm_up so that the first frame off the wire (a read-only view of
    # the received bytes) pays no compilation; in a fresh process, what does measuring and
    # tracking such frames still add after it? (Checking one kernel's signatures misses the
    # kernel the frame path actually calls; the whole frame path: tests/test_monitor.py.)
    new = new_specialisations(
        setup="""
            import numpy as np
            from lhtstream.io import protocol
            from lhtstream.kernels import features as F
            F.warm_up()
        """,
        probe="""
            pixels = np.arange(16 * 22, dtype=np.uint16).reshape(16, 22) % 300
            previous = np.zeros_like(pixels)
            state = F.new_track_state()
            row = np.zeros(F.N_FEATURES)
            for k in range(5):
                parts = [bytes(p) for p in protocol.encode_frame(
                    pixels, stream="ws1", video="0001", type=1, seq=k, index=k, obstacle=k % 3)]
                message = protocol.decode(parts)
                F.measure_frame(protocol.frame_array(message), previous, F.DEFAULT_THRESHOLD, row)
                row[F.OBSTACLE] = message.header["obstacle"]
                F.track_step(state, row)
        """)
    assert new == {}


# ------------------------------------------------------------ against the project's simulator


@pytest.mark.parametrize("type_id", [1, 5, 12, 20, 27, 33])
def test_phase_within_half_a_frame_of_simulator_truth(type_id):
    from lhtstream.io.simulate import simulate_video

    sim = simulate_video(type_id, 7, 3000)
    obstacles = obstacle_states(sim.metadata)
    feats = F.video_features(sim.image, obstacles)
    err = circular_error(feats[100:, F.PHASE], sim.truth["phase"][100:])
    assert err.max() < 0.5
    assert np.median(err) < 0.2
    # the loop's rate is a smoothed estimate; truth jitters frame to frame
    truth_rate = np.convolve(sim.truth["rate"], np.ones(200) / 200, mode="same")
    rate_err = np.abs(feats[500:-100, F.RATE] - truth_rate[500:-100])
    assert rate_err.max() < 1.5e-3 and np.median(rate_err) < 3e-4


def test_phase_relocks_after_simulated_frequency_drift():
    from lhtstream.io.simulate import simulate_video

    sim = simulate_video(20, 5, 4000, anomaly="frequency_drift", windows=[])
    _, onset, end, magnitude = sim.label
    assert magnitude >= 0.02 and end + 600 < 4000
    feats = F.video_features(sim.image)
    err = circular_error(feats[:, F.PHASE], sim.truth["phase"])
    rate_err = np.abs(feats[:, F.RATE] - sim.truth["rate"])
    assert err[100:onset].max() < 0.5
    assert err[onset + 300:end].max() < 0.5  # locked onto the new frequency
    assert rate_err[end - 100:end].max() < 3e-3
    assert err[end + 300:].max() < 0.5  # and back
    assert rate_err[end + 500:].max() < 3e-3


@pytest.mark.parametrize("kind, flag", [("frame_freeze", F.REPEAT), ("camera_dropout", F.EMPTY)])
def test_sensor_faults_are_flagged_and_the_phase_coasts_through(kind, flag):
    from lhtstream.io.simulate import simulate_video

    sim = simulate_video(20, 5, 4000, anomaly=kind, windows=[])
    _, onset, end, _ = sim.label
    feats = F.video_features(sim.image)
    flagged = np.flatnonzero(feats[:, flag])
    assert flagged[0] == onset and flagged[-1] == end and len(flagged) == end - onset + 1
    if flag == F.EMPTY:  # last position carried forward
        assert (feats[onset:end + 1, F.X] == feats[onset - 1, F.X]).all()
    assert (feats[onset + 1:end + 1, F.RATE] == feats[onset, F.RATE]).all()  # loop frozen
    err = circular_error(feats[100:, F.PHASE], sim.truth["phase"][100:])
    assert err.max() < 0.5
