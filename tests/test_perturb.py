"""The unseen-fault catalogue (`lhtstream.io.perturb`, `lhtstream perturb`): each perturbation
changes only frames from its onset, does what its name says, and a perturbed copy of a data
set is a valid data set that `evaluate` reports per perturbation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lhtstream.cli import main
from lhtstream.io.dataset import Dataset, obstacle_states, read_labels, validate
from lhtstream.io.perturb import (
    PERTURBATIONS,
    PerturbError,
    first_change,
    perturb_video,
    read_manifest,
)
from lhtstream.io.simulate import simulate_video

ONSET = 600
FAMILIES = {"optics", "stray_light", "sensor", "alignment", "timing"}


@pytest.fixture(scope="module")
def video():
    v = simulate_video(3, 21, 2000)  # Type3: two obstacle windows
    return v.image, obstacle_states(v.metadata)


def _perturb(video, kind, seed=5, **kw):
    image, obs = video
    return perturb_video(image, kind, ONSET, np.random.default_rng(seed), obstacles=obs, **kw)


def _centroid(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = frames.astype(np.float64)
    r, c = np.indices(f.shape[1:])
    total = f.sum(axis=(1, 2))
    return (f * r).sum(axis=(1, 2)) / total, (f * c).sum(axis=(1, 2)) / total


def test_catalogue_has_at_least_eight_kinds_in_every_family():
    assert len(PERTURBATIONS) >= 8
    assert {p.family for p in PERTURBATIONS.values()} == FAMILIES
    assert all(p.meaning for p in PERTURBATIONS.values())


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_only_frames_from_the_onset_change_and_stay_in_the_camera_range(video, kind):
    image, obs = video
    out, out_obs = _perturb(video, kind)
    assert out.dtype == np.uint16 and out.max() <= 1024
    assert np.array_equal(out[:ONSET], image[:ONSET])
    assert np.array_equal(out_obs[:ONSET], obs[:ONSET])
    n = min(len(out), len(image))
    changed = np.flatnonzero(np.any(out[ONSET:n] != image[ONSET:n], axis=(1, 2)))
    assert len(changed) and changed[0] < 200, f"{kind} changed nothing soon after the onset"
    # the same random stream gives the same fault
    assert np.array_equal(_perturb(video, kind)[0], out)


def test_blur_keeps_the_energy_and_lowers_the_peak(video):
    image, _ = video
    out, _ = _perturb(video, "blur")
    a, b = image[ONSET:].astype(float), out[ONSET:].astype(float)
    assert b.sum() / a.sum() == pytest.approx(1.0, abs=0.03)
    assert np.median(b.max(axis=(1, 2))) < 0.85 * np.median(a.max(axis=(1, 2)))


def test_ghost_alternate_touches_every_second_frame_only(video):
    image, _ = video
    out, _ = _perturb(video, "ghost_alternate")
    diff = np.any(out[ONSET:] != image[ONSET:], axis=(1, 2))
    assert not diff[1::2].any() and diff[::2].mean() > 0.9


def test_gain_drift_reaches_its_magnitude_after_3000_frames():
    image = np.full((4000, 4, 4), 200, dtype=np.uint16)
    out, _ = perturb_video(image, "gain_drift", 100, np.random.default_rng(0))
    m = PERTURBATIONS["gain_drift"].magnitude
    assert out[100 + 1499, 0, 0] == pytest.approx(200 * (1 + m / 2), abs=1)
    assert np.all(out[3100:] == round(200 * (1 + m)))


def test_shift_moves_the_spot_by_half_a_pixel_each_axis(video):
    image, _ = video
    out, _ = _perturb(video, "shift")
    r0, c0 = _centroid(image[ONSET:])
    r1, c1 = _centroid(out[ONSET:])
    assert np.median(r1 - r0) == pytest.approx(0.5, abs=0.1)
    assert np.median(c1 - c0) == pytest.approx(0.5, abs=0.1)


def test_clipping_caps_at_half_the_normal_peak(video):
    image, _ = video
    out, _ = _perturb(video, "clipping")
    cap = 0.5 * np.median(image[:ONSET].reshape(ONSET, -1).max(axis=1))
    assert out[ONSET:].max() <= round(cap) and image[ONSET:].max() > 1.5 * cap


def test_dead_pixels_read_zero_in_a_block(video):
    out, _ = _perturb(video, "dead_pixels")
    dead = np.all(out[ONSET:] == 0, axis=0)
    assert dead.sum() >= 9


def test_timing_faults_reorder_drop_or_repeat_whole_frames(video):
    image, obs = video
    keyed = {f.tobytes(): i for i, f in enumerate(image)}
    dropped, dobs = _perturb(video, "dropped_frames")
    idx = [keyed[f.tobytes()] for f in dropped]
    assert len(dropped) < len(image) and np.all(np.diff(idx) > 0)  # a subsequence
    assert np.array_equal(dobs, obs[idx])  # obstacle states follow their frames
    dup, _ = _perturb(video, "duplicated_frames")
    same = [a.tobytes() == b.tobytes() for a, b in zip(dup[ONSET:-1], dup[ONSET + 1:],
                                                       strict=True)]
    assert len(dup) > len(image) and 0.005 < np.mean(same) < 0.05
    swapped, _ = _perturb(video, "swapped_frames")
    idx = [keyed[f.tobytes()] for f in swapped]
    assert sorted(idx) == list(range(len(image))) and idx != sorted(idx)


def test_first_change_is_where_a_sporadic_fault_first_shows(video):
    image, _ = video
    # every frame distinct, its index in pixel (0, 0): a copy's pixel tells its source frame
    stamped = image.copy()
    stamped[:, 0, 0] = np.arange(len(image))
    dropped, _ = perturb_video(stamped, "dropped_frames", ONSET, np.random.default_rng(5))
    first_dropped = ONSET + int(np.flatnonzero(dropped[ONSET:, 0, 0] != np.arange(
        ONSET, len(dropped)))[0])
    assert first_dropped > ONSET  # 2 % per frame: not at the onset itself
    assert first_change(stamped, dropped, ONSET) == first_dropped
    blurred, _ = perturb_video(stamped, "blur", ONSET, np.random.default_rng(5))
    assert first_change(stamped, blurred, ONSET) == ONSET  # a lasting fault shows at once
    dark = np.zeros_like(image)  # dead pixels on a black video change nothing
    dead, _ = perturb_video(dark, "dead_pixels", ONSET, np.random.default_rng(5))
    assert first_change(dark, dead, ONSET) == -1


def test_bad_arguments_are_clear_errors(video):
    image, _ = video
    with pytest.raises(PerturbError, match="unknown perturbation 'fog'"):
        perturb_video(image, "fog", ONSET, np.random.default_rng(0))
    with pytest.raises(PerturbError, match="onset"):
        perturb_video(image, "blur", len(image), np.random.default_rng(0))


@pytest.fixture(scope="module")
def perturbed(dataset_factory, tmp_path_factory):
    # ~9 normal videos per type: a model needs 3 held-out videos (other than its training
    # ones) to judge the groups that vary from video to video (detector.calibrate)
    src = dataset_factory(types=[1, 3], videos_per_type=10, frames=1500, anomaly_rate=0.1,
                          seed=8)
    out = tmp_path_factory.mktemp("perturbed") / "p"
    assert main(["perturb", str(src), str(out), "--kinds", "blur,dropped_frames,ghost",
                 "--seed", "2"]) == 0
    return src, out


def test_perturb_cli_writes_a_valid_labelled_copy(perturbed, capsys):
    src, out = perturbed
    assert validate(out) == []
    labels = read_labels(out)
    manifest = read_manifest(out)
    src_labels = read_labels(src)
    normal_src = [k for k, lab in src_labels.items() if lab.kind == "normal"]
    # per normal source: an unchanged copy under its own name + one copy per kind
    assert sum(lab.kind == "normal" for lab in labels.values()) == len(normal_src)
    assert len(manifest) == 3 * len(normal_src)
    ds = Dataset(out)
    for (t, name), row in manifest.items():
        lab = labels[(t, name)]
        assert lab.kind == row["kind"] and lab.onset_frame == int(row["onset_frame"])
        assert PERTURBATIONS[lab.kind].family == row["family"]
        v = ds.video(t, name)
        src_frames = Dataset(src).video(t, row["source"]).load()
        frames = v.load()  # the metadata matches the (perhaps shorter) video
        assert 0.2 * 1500 <= lab.onset_frame <= 0.55 * 1500
        assert lab.end_frame == len(frames) - 1
        assert np.array_equal(frames[: lab.onset_frame], src_frames[: lab.onset_frame])
    copies = set(labels) - set(manifest)
    assert copies == set(normal_src)  # anomalous sources are neither copied nor perturbed
    for t, name in copies:
        assert np.array_equal(ds.video(t, name).load(), Dataset(src).video(t, name).load())


def test_perturb_cli_refuses_a_used_folder_and_unknown_kinds(perturbed, capsys, tmp_path):
    src, out = perturbed
    assert main(["perturb", str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["perturb", str(src), str(tmp_path / "x"), "--kinds", "fog"]) == 2
    assert "unknown perturbation(s) fog" in capsys.readouterr().err
    assert main(["perturb", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(k in listed for k in PERTURBATIONS)


def test_evaluate_reports_each_perturbation_with_its_family(perturbed, tmp_path, capsys):
    from lhtstream.service.training import fit_dataset

    src, out = perturbed
    model = fit_dataset(src).save(tmp_path / "m.npz")
    report_path = tmp_path / "r.json"
    assert main(["evaluate", str(out), "--model", str(model), "--no-baseline",
                 "--json", str(report_path)]) == 0
    text = capsys.readouterr().out
    assert "unseen faults" in text and "dropped_frames" in text
    per_kind = json.loads(report_path.read_text())["per_kind"]
    with (out / "perturbations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for kind in ("blur", "dropped_frames", "ghost"):
        k = per_kind[kind]
        assert k["family"] == PERTURBATIONS[kind].family
        assert k["videos"] == sum(r["kind"] == kind for r in rows)
        assert k["types"] == 2 and k["expected_alarm_kind"] is None
        assert 0.0 <= k["detected_any_kind_fraction"] <= 1.0
        assert k["quiet_source_videos"] <= k["videos"]  # paired with their sources
    for r in rows:  # a copy differs from its source from its onset on, or (sporadic) later
        assert int(r["first_changed_frame"]) in (-1, *range(int(r["onset_frame"]),
                                                            int(r["frames"])))
    assert "from change" in text
    # a camera that loses 2 % of its frames makes the spot jump: every copy is alarmed
    assert per_kind["dropped_frames"]["detected_any_kind_fraction"] == 1.0


def test_scale_multiplies_the_magnitudes(perturbed, tmp_path):
    src, _ = perturbed
    out = tmp_path / "half"
    assert main(["perturb", str(src), str(out), "--kinds", "blur,gain_drift", "--scale",
                 "0.5"]) == 0
    mags = {lab.kind: lab.magnitude for lab in read_labels(out).values() if lab.kind != "normal"}
    assert mags == {"blur": 0.5 * PERTURBATIONS["blur"].magnitude,
                    "gain_drift": 0.5 * PERTURBATIONS["gain_drift"].magnitude}
    with pytest.raises(SystemExit) as info:  # argparse: one line, exit status 2
        main(["perturb", str(src), str(tmp_path / "bad"), "--scale", "0"])
    assert info.value.code == 2 and not (tmp_path / "bad").exists()


def test_a_false_alarm_the_source_already_had_is_not_a_detection():
    from lhtstream.service.evaluate import VideoResult, summarise

    def vr(name, kind, raises, onset=None):
        return VideoResult(type=4, name=name, kind=kind, onset=onset, end=None if onset is None
                           else 9999, frames=10000, score=0.0, anomalous=False, raises=raises)

    results = [vr("0001", "normal", [(7000, "frequency")]), vr("0002", "normal", []),
               vr("0003", "blur", [(7000, "frequency")], onset=3000),  # the source's own alarm
               vr("0004", "blur", [(3005, "spot_size")], onset=3000),
               vr("0005", "blur", [(3020, "image")], onset=3000),
               vr("0006", "blur", [], onset=3000)]
    manifest = {(4, "0003"): {"source": "0001", "first_changed_frame": "3000"},
                (4, "0004"): {"source": "0002", "first_changed_frame": "3002"},
                (4, "0005"): {"source": "0002", "first_changed_frame": "3016"},
                (4, "0006"): {"source": "0002", "first_changed_frame": "-1"}}
    k = summarise(results, manifest)["per_kind"]["blur"]
    assert k["detected_any_kind_fraction"] == 0.75  # counting every raise in the window
    assert k["quiet_source_videos"] == 3 and k["alarmed_quiet_source_fraction"] == 2 / 3
    assert k["delay_quiet_source_median"] == 12.5  # 5 and 20 frames after the onset
    # 3 and 4 frames after the first changed frame; 0006 never changed a pixel
    assert k["delay_first_change_median"] == 3.5 and k["unchanged_quiet_source_videos"] == 1
    assert "quiet_source_videos" not in summarise(results)["per_kind"]["blur"]
    # a manifest written before first_changed_frame existed: no first-change figures
    old = {key: {"source": row["source"]} for key, row in manifest.items()}
    k = summarise(results, old)["per_kind"]["blur"]
    assert k["quiet_source_videos"] == 3 and "delay_first_change_median" not in k
