"""lhtstream.io.simulate: scan geometry, obstacles, anomalies from their onset, determinism, CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lhtstream.io.dataset import Dataset, obstacle_states, read_labels, validate
from lhtstream.io.simulate import (
    ANOMALY_KINDS,
    DEFAULT_MAGNITUDE,
    Anomaly,
    simulate_video,
    synthesize,
)


def centroid(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain intensity-weighted centroid per frame (x = column, y = row) and total intensity."""
    img = img.astype(np.float64)
    total = img.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (img.sum(axis=1) * np.arange(img.shape[2])).sum(axis=1) / total
        y = (img.sum(axis=2) * np.arange(img.shape[1])).sum(axis=1) / total
    return x, y, total


def dominant_period(signal: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(signal - signal.mean()))
    freqs = np.fft.rfftfreq(len(signal))
    return 1.0 / freqs[1 + np.argmax(spectrum[1:])]


@pytest.fixture(scope="module")
def plain():
    """Type 1 has no obstacle windows."""
    return simulate_video(1, 5, 2000)


def test_centroid_period_is_ten_vertically_five_horizontally(plain):
    x, y, _ = centroid(plain.image)
    assert dominant_period(y) == pytest.approx(10.0, abs=0.05)
    assert dominant_period(x) == pytest.approx(5.0, abs=0.05)


def test_frames_look_like_the_real_camera(plain):
    img = plain.image
    assert img.dtype == np.uint16 and img.max() <= 1024
    peaks = img.max(axis=(1, 2))
    assert 120 <= np.median(peaks) <= 350  # real example peaks around 250
    # a compact blob: most pixels near zero, a few dozen lit
    lit = (img > 0.2 * peaks[:, None, None]).sum(axis=(1, 2))
    assert 4 <= np.median(lit) <= 60
    assert np.median((img <= 2).mean(axis=(1, 2))) > 0.6


def test_truth_follows_the_convention(plain):
    t = plain.truth
    x, y, _ = centroid(plain.image)
    # the centroid of the difference frame sits near the mid-exposure spot position
    assert np.median(np.hypot(x - t["x"], y - t["y"])) < 0.5
    # phase grows ~1 per frame and wraps at 10
    step = np.mod(np.diff(t["phase"]), 10.0)
    assert np.all(np.abs(step - 1.0) < 0.01) and np.all((t["phase"] >= 0) & (t["phase"] < 10))
    # not exactly 100 Hz: the 10 samples precess
    assert abs(step.mean() - 1.0) > 1e-5
    # phase 0 = centre of the top edge: the spot is at its highest (smallest y), mid-width
    near0 = (t["phase"] < 0.3) | (t["phase"] > 9.7)
    assert t["y"][near0].mean() < t["y"].min() + 0.2
    assert abs(t["x"][near0].mean() - np.median(t["x"])) < 0.5
    # at phase 5 the spot is at the bottom edge centre
    near5 = np.abs(t["phase"] - 5.0) < 0.3
    assert t["y"][near5].mean() > t["y"].max() - 0.2
    # segment 1 runs right to left
    seg1 = (t["phase"] > 9.5) | (t["phase"] < 0.5)
    assert np.median(np.diff(t["x"])[seg1[:-1] & (np.abs(np.diff(t["phase"]) - 1) < 0.1)]) < 0


def test_geometry_differs_between_types_and_videos():
    shapes = {simulate_video(t, 0, 20).image.shape[1:] for t in range(1, 37, 4)}
    assert len(shapes) >= 4
    a, b = simulate_video(2, 1, 500), simulate_video(2, 2, 500)
    assert a.image.shape == b.image.shape and a.metadata["LeftBordPx"] == b.metadata["LeftBordPx"]
    assert abs(a.truth["x"].mean() - b.truth["x"].mean()) > 1e-3


def test_obstacle_windows_change_the_path_only_inside_their_key_frames():
    with_obs = simulate_video(3, 9, 3000)  # Type3: two windows (middle, bottom)
    without = simulate_video(3, 9, 3000, windows=[])
    m = with_obs.metadata
    windows = [
        (m["KeyfIniObstacle1"], m["KeyfEndObstacle1"]),
        (m["KeyfIniObstacle2"], m["KeyfEndObstacle2"]),
    ]
    assert all(0 < a <= b < 3000 for a, b in windows) and windows[0][1] < windows[1][0]
    assert without.metadata["KeyfIniObstacle1"] == -1 == without.metadata["KeyfEndObstacle2"]
    inside = obstacle_states(m) > 0
    moved = np.hypot(
        with_obs.truth["x"] - without.truth["x"], with_obs.truth["y"] - without.truth["y"]
    )
    assert np.all(moved[~inside] == 0)
    assert np.mean(moved[inside] > 0.5) > 0.5
    assert np.array_equal(with_obs.truth["pattern"] > 0, inside)
    # frames: identical before the first window, and again once the heat of a window cooled
    first = windows[0][0]
    assert np.array_equal(with_obs.image[:first], without.image[:first])
    assert not np.array_equal(with_obs.image[first], without.image[first])
    settle = 100
    assert np.array_equal(
        with_obs.image[windows[0][1] + settle : windows[1][0]],
        without.image[windows[0][1] + settle : windows[1][0]],
    )
    assert np.array_equal(
        with_obs.image[windows[1][1] + settle :], without.image[windows[1][1] + settle :]
    )


def test_top_obstacle_pattern_avoids_the_obstacle():
    from lhtstream.io.simulate import params

    cfg = params.type_config(2)  # workpiece 1: one "top" window
    assert cfg.obstacles == ("top",)
    v = simulate_video(2, 4, 3000)
    a, b = v.metadata["KeyfIniObstacle1"], v.metadata["KeyfEndObstacle1"]
    x, y = v.truth["x"][a : b + 1], v.truth["y"][a : b + 1]
    cx, cy = v.info["centre"]
    on_top = y < cy - 0.8 * cfg.half_height * v.info["scale"]
    ox = cx + v.info["scale"] * cfg.obstacle_x[0]
    gap = params.OBSTACLE_GAP_REL * cfg.width
    assert on_top.sum() >= 10
    assert np.all(np.abs(x[on_top] - ox) > 0.7 * gap)
    # outside the window (before or after it) the eight crosses the same place
    outside = np.r_[0:a, b + 1:len(v.truth["x"])]
    xo, yo = v.truth["x"][outside], v.truth["y"][outside]
    assert np.any((yo < cy - 0.8 * cfg.half_height) & (np.abs(xo - ox) < 0.3 * gap))


ONSET, END = 1000, 1399


@pytest.fixture(scope="module")
def baseline():
    return simulate_video(6, 4, 2200)  # Type6: two windows (top, middle) early/late


def _span(v):
    return slice(ONSET, END + 1)


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_anomaly_changes_nothing_before_its_onset(baseline, kind):
    m = baseline.metadata
    onset, end = ONSET, END
    if kind == "obstacle_pattern_misplaced":  # must lie outside the real windows
        assert m["KeyfEndObstacle1"] < onset and m["KeyfIniObstacle2"] > end
    an = simulate_video(6, 4, 2200, Anomaly(kind, onset, end, DEFAULT_MAGNITUDE[kind]))
    assert an.label == (kind, onset, end, DEFAULT_MAGNITUDE[kind])
    assert an.metadata == baseline.metadata
    assert np.array_equal(an.image[:onset], baseline.image[:onset])
    for key in ("x", "y", "phase"):
        assert np.array_equal(an.truth[key][:onset], baseline.truth[key][:onset])
    # ... and changes the frames from the onset on
    changed = np.flatnonzero(np.any(an.image[onset:] != baseline.image[onset:], axis=(1, 2)))
    assert len(changed) and changed[0] <= 2


def _pair(kind, magnitude=None):
    base = simulate_video(20, 4, 2200, windows=[])
    mag = DEFAULT_MAGNITUDE[kind] if magnitude is None else magnitude
    return base, simulate_video(20, 4, 2200, Anomaly(kind, ONSET, END, mag), windows=[])


def test_position_noise_has_the_protocol_sigma():
    base, an = _pair("position_noise")
    d = np.concatenate([(an.truth[k] - base.truth[k])[ONSET : END + 1] for k in ("x", "y")])
    assert d.std() == pytest.approx(np.sqrt(0.02), rel=0.15)
    assert np.all(an.truth["x"][END + 1 :] == base.truth["x"][END + 1 :])
    x0, y0, _ = centroid(base.image)
    x1, y1, _ = centroid(an.image)
    assert np.std((x1 - x0)[ONSET : END + 1]) > 0.08


@pytest.mark.parametrize("kind, lo, hi", [("power_drop", 0.55, 0.75), ("power_spike", 1.35, 1.65)])
def test_power_faults_scale_the_heat(kind, lo, hi):
    base, an = _pair(kind)
    _, _, s0 = centroid(base.image)
    _, _, s1 = centroid(an.image)
    ratio = s1[ONSET + 20 : END + 1].mean() / s0[ONSET + 20 : END + 1].mean()
    assert lo < ratio < hi
    assert s1[END + 60 :].mean() == pytest.approx(s0[END + 60 :].mean(), rel=0.01)


def test_scanner_stall_freezes_the_spot():
    base, an = _pair("scanner_stall")
    t = an.truth
    assert np.ptp(t["x"][ONSET + 1 : END + 1]) < 0.3  # only jitter moves it
    assert np.all(t["rate"][ONSET : END + 1] == 0)
    _, _, s0 = centroid(base.image)
    _, _, s1 = centroid(an.image)
    assert s1[ONSET + 10 : END + 1].mean() < 0.2 * s0[ONSET + 10 : END + 1].mean()
    assert np.ptp(t["x"][END + 1 :]) > 5  # scanning again afterwards


def test_pattern_shrink_scales_the_eight():
    base, an = _pair("pattern_shrink")
    cx, cy = base.info["centre"]
    sl = slice(ONSET, END + 1)
    r0 = np.hypot(base.truth["x"][sl] - cx, base.truth["y"][sl] - cy)
    r1 = np.hypot(an.truth["x"][sl] - cx, an.truth["y"][sl] - cy)
    assert np.median(r1 / r0) == pytest.approx(0.8, abs=0.02)
    x0, _, _ = centroid(base.image)
    x1, _, _ = centroid(an.image)
    assert np.std(x1[sl]) < 0.9 * np.std(x0[sl])


def test_frequency_drift_speeds_up_the_scanner():
    base, an = _pair("frequency_drift")
    rate0, rate1 = base.truth["rate"], an.truth["rate"]
    assert np.all(rate1[:ONSET] == rate0[:ONSET])
    assert np.median(rate1[ONSET + 30 : END + 1] / rate0[ONSET + 30 : END + 1]) == pytest.approx(
        1.03
    )
    assert rate1[ONSET] > rate0[ONSET]


def test_spot_defocus_spreads_the_blob():
    base, an = _pair("spot_defocus")
    sl = slice(ONSET + 20, END + 1)

    def area(img):
        return (img > 0.5 * img.max(axis=(1, 2), keepdims=True)).sum(axis=(1, 2))

    assert np.median(area(an.image[sl])) > 1.4 * np.median(area(base.image[sl]))
    assert np.median(an.image[sl].max(axis=(1, 2))) < 0.6 * np.median(
        base.image[sl].max(axis=(1, 2))
    )


def test_obstacle_pattern_misplaced_runs_outside_the_metadata_window():
    base, an = _pair("obstacle_pattern_misplaced")
    assert an.metadata["KeyfIniObstacle1"] == -1
    assert np.all(an.truth["pattern"][ONSET : END + 1] > 0)
    assert not np.any(an.truth["pattern"][:ONSET]) and not np.any(an.truth["pattern"][END + 1 :])
    # drawn by kind: the span never touches the video's own windows
    v = simulate_video(6, 11, 3000, "obstacle_pattern_misplaced")
    _, onset, end, _ = v.label
    states = obstacle_states(v.metadata)
    assert not np.any(states[onset : end + 1]) and np.all(v.truth["pattern"][onset : end + 1] > 0)


def test_sensor_faults():
    base, drop = _pair("camera_dropout")
    assert not drop.image[ONSET : END + 1].any() and drop.image[ONSET - 1].any()
    assert np.array_equal(drop.image[END + 1 :], base.image[END + 1 :])
    _, freeze = _pair("frame_freeze")
    frozen = freeze.image[ONSET : END + 1]
    assert all(f.tobytes() == base.image[ONSET - 1].tobytes() for f in frozen)
    assert np.array_equal(freeze.image[END + 1 :], base.image[END + 1 :])


def test_drawn_anomalies_start_after_the_first_fifth():
    for i, kind in enumerate(ANOMALY_KINDS):
        v = simulate_video(10, i, 2000, kind)
        k, onset, end, mag = v.label
        assert k == kind and mag == DEFAULT_MAGNITUDE[kind]
        assert 0.2 * 2000 <= onset <= end < 2000 and 1 <= end - onset + 1 <= 1000


def test_deterministic_and_seed_sensitive(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kwargs = dict(types=[4, 30], videos_per_type=2, frames=300, anomaly_rate=0.5)
    synthesize(a, seed=3, **kwargs)
    synthesize(b, seed=3, **kwargs)
    synthesize(c, seed=4, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * (2 * 2 + 1) + 1  # videos + truth per type, metadata, labels
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "Type4/0001.npz").read_bytes() != (c / "Type4/0001.npz").read_bytes()


def test_small_dataset_covers_every_kind_and_validates(small_dataset):
    labels = read_labels(small_dataset)
    ds = Dataset(small_dataset)
    assert set(labels) == {(v.type, v.name) for v in ds.videos()}
    kinds = [lb.kind for lb in labels.values()]
    assert set(kinds) == {"normal", *ANOMALY_KINDS}
    assert kinds.count("normal") == 12
    for lb in labels.values():
        if lb.anomalous:
            assert 300 <= lb.onset_frame <= lb.end_frame < 1500 and lb.magnitude is not None
        else:
            assert lb.onset_frame is None and lb.end_frame is None and lb.magnitude is None
    assert validate(small_dataset) == []
    truth = np.load(small_dataset / "truth" / "Type1" / "0001.npz")
    assert {"x", "y", "phase"} <= set(truth.files) and truth["phase"].shape == (1500,)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_synth_cli(tmp_path):
    out = tmp_path / "set"
    r = _cli(
        "synth",
        str(out),
        "--types",
        "2,7-8",
        "--videos-per-type",
        "2",
        "--frames",
        "200",
        "--anomaly-rate",
        "1",
        "--anomalies",
        "power_drop,frame_freeze",
        "--seed",
        "5",
    )
    assert r.returncode == 0, r.stderr
    assert "6 videos" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert Dataset(out).types == [2, 7, 8]
    kinds = sorted(lb.kind for lb in read_labels(out).values())
    assert kinds == ["frame_freeze"] * 3 + ["power_drop"] * 3
    v = _cli("validate", str(out))
    assert v.returncode == 0 and "OK" in v.stdout
    bad = _cli("synth", str(tmp_path / "x"), "--anomalies", "laser_on_fire")
    assert bad.returncode == 2 and "laser_on_fire" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("synth", str(tmp_path / "x"), "--types", "0-3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
