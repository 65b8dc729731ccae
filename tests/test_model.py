"""Normality model: fit, O(1) scoring, online adaptation, save/load and its refusals."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from lhtstream.io.dataset import Dataset, obstacle_states
from lhtstream.io.simulate import simulate_video
from lhtstream.kernels.features import INTENSITY, PEAK, measure_video, track, video_features
from lhtstream.kernels.scoring import ADAPT_MEAN_SD, ADAPT_VAR_RATIO
from lhtstream.model import model_file
from lhtstream.model.normality import (
    COMB,
    INT_HIGH,
    SLIP,
    TRAJ,
    ModelError,
    NormalityModel,
    adaptation_extent,
)
from lhtstream.service.pipeline import StreamPipeline
from tests.processes import run_cli

FRAMES = 2500


def _rows(type_id: int, seed: int, anomaly=None) -> np.ndarray:
    v = simulate_video(type_id, seed, FRAMES, anomaly)
    return video_features(v.image, obstacle_states(v.metadata))


@pytest.fixture(scope="module")
def videos():
    return [(t, _rows(t, s)) for t in (1, 3) for s in range(4)]


@pytest.fixture(scope="module")
def model(videos):
    return NormalityModel.fit(videos)


def test_noise_on_positions_raises_video_trajectory_score(model):
    rng = np.random.default_rng(1)
    clean = _rows(1, 50)
    v = simulate_video(1, 50, FRAMES)
    from lhtstream.kernels.features import X, Y, measure_video, track

    meas = measure_video(v.image)
    meas[:, X] += rng.normal(0, np.sqrt(0.02), FRAMES)
    meas[:, Y] += rng.normal(0, np.sqrt(0.02), FRAMES)
    noisy = track(meas, obstacle_states(v.metadata))
    sc, ok = model.score_rows(1, clean)
    sn, okn = model.score_rows(1, noisy)
    clean_traj = sc[ok == 1, TRAJ].mean()
    noisy_traj = sn[okn == 1, TRAJ].mean()
    assert 1.0 < clean_traj < 4.0  # chi2(2) has mean 2 on normal data
    assert noisy_traj > 2 * clean_traj
    # the cycle comb (move since the same point one scan cycle earlier) does not depend
    # on the video's geometry: 0.14 px noise multiplies its chi2(2) level many times
    clean_comb = sc[ok == 1, COMB].mean()
    noisy_comb = sn[okn == 1, COMB].mean()
    assert 1.0 < clean_comb < 4.0
    assert noisy_comb > 4 * clean_comb


def test_frequency_step_shows_as_cycle_slip_not_as_comb_residual(model):
    from lhtstream.io.simulate import Anomaly

    v = simulate_video(1, 51, FRAMES, Anomaly("frequency_drift", 1200, 1800, 0.03))
    rows = video_features(v.image, obstacle_states(v.metadata))
    sc, ok = model.score_rows(1, rows)
    before = sc[200:1200][ok[200:1200] == 1]
    after = sc[1220:1260][ok[1220:1260] == 1]  # within 2-6 cycles of the onset
    assert before[:, SLIP].mean() < 1.0
    assert after[:, SLIP].mean() > 8.0
    assert after[:, COMB].mean() < 4.0  # the consistent slip is left to the frequency group


def test_model_file_does_not_grow_with_training_size(videos, tmp_path):
    """O(1) per frame needs a model whose size depends on types and bins only: twice the
    training frames give a file with the same arrays, shape for shape (read from the
    saved file, whatever the model calls its arrays inside)."""
    small = NormalityModel.fit(videos[:2] + videos[4:6])
    big = NormalityModel.fit(videos)
    assert big.training["frames"] == 2 * small.training["frames"]
    with np.load(small.save(tmp_path / "small.npz"), allow_pickle=False) as a, \
            np.load(big.save(tmp_path / "big.npz"), allow_pickle=False) as b:
        shapes = {k: (a[k].shape, a[k].dtype) for k in a.files if k != "header"}
        assert shapes == {k: (b[k].shape, b[k].dtype) for k in b.files if k != "header"}
        assert sum(a[k].nbytes for k in a.files) < 1_000_000 * len(small.types)


def test_save_load_round_trip_scores_identical(model, tmp_path):
    path = model.save(tmp_path / "m.npz")
    loaded = NormalityModel.load(path)
    rows = _rows(3, 60)
    a, oka = model.score_rows(3, rows)
    b, okb = loaded.score_rows(3, rows)
    assert oka.any()  # the comparison covers judged frames, not only "not judged"
    assert np.array_equal(a, b) and np.array_equal(oka, okb)
    assert loaded.training == model.training


def _rewrite(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    header = json.loads(bytes(data["header"]).decode())
    header, data = edit(header, data)
    data["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(dst, **data)


def test_refuses_tampered_other_version_and_mismatched_settings(model, tmp_path):
    src = model.save(tmp_path / "m.npz")

    def tamper(h, d):
        d["mean"] = d["mean"] + 0.5
        return h, d

    def version(h, d):
        h["format_version"] = 999
        return h, d

    def settings(h, d):
        h["features"]["threshold"] = h["features"].get("threshold", 8.0) + 1.0
        return h, d

    def layout(h, d):  # made by an lhtstream whose model table was laid out differently
        h["layout"] = "0123456789abcdef"
        return h, d

    for edit, words in ((tamper, "checksum"), (version, "version"), (settings, "feature settings"),
                        (layout, "made for table layout '0123456789abcdef'.*retrain")):
        dst = tmp_path / f"{edit.__name__}.npz"
        _rewrite(src, dst, edit)
        with pytest.raises(ModelError, match=words):
            NormalityModel.load(dst)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="junk.npz"):
        NormalityModel.load(junk)
    assert zipfile.is_zipfile(src)


def _edited(src, dst, edit):
    """`src` with `edit(header, arrays)` applied and the checksum recomputed, as an editor
    (or a bug) would write it: the checksum is an integrity check, not a signature."""
    def rehashed(h, d):
        h, d = edit(h, d)
        if isinstance(h, dict):
            h["sha256"] = model_file.digest({k: v for k, v in d.items() if k != "header"})
        return h, d

    _rewrite(src, dst, rehashed)
    return dst


def _arrays(change):
    def edit(h, d):
        change(d)
        return h, d
    return edit


def _header(change):
    def edit(h, d):
        return change(h), d
    return edit


def _set(name, index, value):
    def change(d):
        d[name] = d[name].copy()
        d[name][index] = value
    return change


def _field(name, value):
    def change(h):
        h[name] = value
        return h
    return change


_NOT_PD = np.array([[1.0, 2.0], [2.0, 1.0]])  # symmetric, eigenvalues 3 and -1

BAD_MODELS = {
    # thresholds: NaN and inf gave a monitor that never alarms, negative ones false alarms
    "raise_nan": (_arrays(_set("raise_thr", (0, 0), np.nan)), "raise_thr"),
    "raise_negative": (_arrays(_set("raise_thr", (0, 1), -1.0)), "raise_thr"),
    "raise_minus_inf": (_arrays(_set("raise_thr", (0, 1), -np.inf)), "raise_thr"),
    "clear_nan": (_arrays(_set("clear_thr", (0, 2), np.nan)), "clear_thr"),
    "clear_above_raise": (_arrays(lambda d: (_set("raise_thr", (0, 3), 2.0)(d),
                                             _set("clear_thr", (0, 3), 3.0)(d))), "clear_thr"),
    "video_inf_negative": (_arrays(_set("video_thr", 0, -np.inf)), "video_thr"),
    # variances and covariances the kernels divide by or invert
    "svar_zero": (_arrays(_set("svar", (0, 0, 4, 2), 0.0)), "svar"),
    "rate_variance_zero": (_arrays(_set("rate", (1, 0, 1), 0.0)), "rate"),
    "cov4_not_pd": (_arrays(_set("cov4", (0, 0, 7, slice(0, 2), slice(0, 2)), _NOT_PD)),
                    "cov4"),
    "prec2_not_pd": (_arrays(_set("prec2", (1, 1, 3), _NOT_PD)), "prec2"),
    "cprec_inf": (_arrays(_set("cprec", (0, 0, 0, 0, 0), np.inf)), "cprec"),
    "chol_zero_diagonal": (_arrays(_set("chol", (0, 0, 5, 0), 0.0)), "chol"),
    "mean_nan": (_arrays(_set("mean", (0, 0, 1, 0), np.nan)), "mean"),
    "types_unsorted": (_arrays(_set("types", slice(None), [3, 1])), "types"),
    # the header: a map, with bounded sizes, checked before anything is allocated
    "header_list": (_header(lambda h: [h]), "header is a JSON list"),
    "phase_bins_huge": (_header(_field("phase_bins", 10**9)), "phase_bins"),
    "phase_bins_text": (_header(_field("phase_bins", "50")), "phase_bins"),
    "calibration_list": (_header(_field("calibration", [])), "calibration"),
    "not_judged_number": (_header(lambda h: {**h, "calibration": {"not_judged": 3}}),
                          "calibration.not_judged"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_the_kernels_cannot_score_with_is_refused_naming_the_field(model, tmp_path,
                                                                          case):
    edit, field = BAD_MODELS[case]
    good = _calibrated(model).save(tmp_path / "good.npz")
    NormalityModel.load(good)  # the edits below are what breaks it
    bad = _edited(good, tmp_path / "bad.npz", edit)
    with pytest.raises(ModelError, match=f"bad.npz: .*{field}") as err:
        NormalityModel.load(bad)
    assert "\n" not in str(err.value)


def test_array_shapes_are_checked_before_the_data_are_read(model, tmp_path):
    """A member declaring another shape than the header's phase bins imply is refused from
    its npy header (a huge one would otherwise be decompressed first)."""
    good = _calibrated(model).save(tmp_path / "good.npz")

    def more_bins(h, d):
        h["phase_bins"] = 60
        return h, d

    with pytest.raises(ModelError, match="'mean' has shape .*expected shape"):
        NormalityModel.load(_edited(good, tmp_path / "bins.npz", more_bins))


def test_model_zip_bombs_are_refused_before_anything_is_inflated(model, tmp_path):
    """A model file is an npz from outside, like a video: a bzip2 member (zipfile inflates
    its chunks with no length bound) and a directory of many members (parsed entry by
    entry) are refused by name before zipfile reads them."""
    import zipfile

    good = _calibrated(model).save(tmp_path / "good.npz")
    bz = tmp_path / "bzip2.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bz, "w", zipfile.ZIP_BZIP2) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(ModelError, match="compression method 12"):
        NormalityModel.load(bz)

    crowded = tmp_path / "crowded.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crowded, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        for i in range(2000):
            dst.writestr(f"pad{i}.npy", b"")
    with pytest.raises(ModelError, match="2017 zip members"):
        NormalityModel.load(crowded)


def test_monitor_refuses_a_model_with_nan_thresholds_in_one_line(model, tmp_path):
    good = _calibrated(model).save(tmp_path / "good.npz")
    bad = _edited(good, tmp_path / "bad.npz", BAD_MODELS["raise_nan"][0])
    proc = run_cli("monitor", "--model", bad, "--frames", f"ipc://{tmp_path}/f",
                   "--publish", f"ipc://{tmp_path}/p", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("lhtstream: error:") and "bad.npz" in lines[-1]
    assert "raise_thr" in lines[-1]
    assert "Traceback" not in proc.stderr


def _calibrated(model: NormalityModel) -> NormalityModel:
    """`model` with finite thresholds (as calibration sets them) in every group."""
    m = model.copy()
    m.raise_thr[:] = 10.0
    m.clear_thr[:] = 5.0
    m.video_thr[:] = 3.0
    return m


def _learned(model: NormalityModel, meas: np.ndarray, obs: np.ndarray) -> NormalityModel:
    """The model a stream ends with after 20 passes of `meas` (measured rows) with online
    learning on (rate 0.02) and no group judged (no alarm stops the learning): the
    production path, `StreamPipeline.process_measured`."""
    m = model.copy()
    m.calibration = {"raise": {}}  # calibrated, every threshold inf: nothing is judged
    pipe = StreamPipeline("ws1", m, adapt=True, learn_rate=0.02)
    for k in range(20):
        pipe.start_video(str(k), 1)
        pipe.process_measured(meas, obs, {"video": str(k), "type": 1})
    pipe.end_video_events()
    return pipe.model


def test_learning_follows_a_drift_only_as_far_as_its_bound(model):
    """Online learning may follow slow differences between normal videos, but not
    absorb a fault: a 50 % brighter spot, learned at length, moves each cell's mean by
    at most ADAPT_MEAN_SD trained sd (and variances by ADAPT_VAR_RATIO), so it stays
    alarming; a small offset is learned fully."""
    v = simulate_video(1, 70, FRAMES)
    meas, obs = measure_video(v.image), obstacle_states(v.metadata)
    brighter = meas.copy()
    brighter[:, INTENSITY] *= 1.5
    brighter[:, PEAK] *= 1.5
    before, ok = model.score_rows(1, track(brighter, obs))
    m = _learned(model, brighter, obs)
    after, ok2 = m.score_rows(1, track(brighter, obs))
    assert before[ok == 1, INT_HIGH].mean() > 4.0
    # it moved (learning is on) and stopped at the bound: the mean by ADAPT_MEAN_SD sd,
    # the sd by sqrt(ADAPT_VAR_RATIO) at most
    z0 = before[ok == 1, INT_HIGH].mean()
    z1 = after[ok2 == 1, INT_HIGH].mean()
    assert (z0 - ADAPT_MEAN_SD) / np.sqrt(ADAPT_VAR_RATIO) - 0.2 < z1 < z0 - 0.5
    extent = adaptation_extent(m.table, m.trained, m.slot(1))
    assert ADAPT_MEAN_SD * 0.9 < extent["mean_shift_sd"] <= ADAPT_MEAN_SD + 1e-9
    assert extent["var_ratio"] <= ADAPT_VAR_RATIO + 1e-9
    # the shared model was not touched by learning on its copy
    again, _ = model.score_rows(1, track(brighter, obs))
    assert np.array_equal(again, before)
    # a slightly brighter spot (well inside the bound) is learned as normal
    lighter = meas.copy()
    lighter[:, INTENSITY] *= 1.02
    lighter[:, PEAK] *= 1.02
    z0 = model.score_rows(1, track(lighter, obs))[0][ok == 1, INT_HIGH].mean()
    m = _learned(model, lighter, obs)
    z1 = m.score_rows(1, track(lighter, obs))[0][ok == 1, INT_HIGH].mean()
    assert z0 > 0.2 and abs(z1) < 0.1


def test_known_types_are_judged_and_an_unknown_type_is_not(model):
    # a known type: every frame but the first 100 (phase lock, running centre) and the
    # obstacle switch-overs of Type3; a model that judged nothing would pass "not ok.any()".
    # The switch-overs cost a seed-dependent share of a 2500-frame Type3 video: 0.75-0.93
    # judged over seeds 80-87 before the issue-9 recalibration, 0.82-0.93 after it.
    for type_id, least in ((1, 0.95), (3, 0.85)):
        scores, ok = model.score_rows(type_id, _rows(type_id, 81))
        assert not ok[:100].any() and ok.mean() >= least, (type_id, ok.mean())
        assert np.isfinite(scores[ok == 1]).all()
    _, ok = model.score_rows(5, _rows(5, 1))
    assert not ok.any()


def test_train_cli_writes_loadable_model(tmp_path, capsys):
    from lhtstream.cli import main
    from lhtstream.io.simulate import synthesize

    synthesize(tmp_path / "data", types=[1], videos_per_type=4, frames=1500, seed=3)
    assert len(list(Dataset(tmp_path / "data").videos())) == 4
    rc = main(["train", str(tmp_path / "data"), "-o", str(tmp_path / "m.npz")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out false alarms" in out
    m = NormalityModel.load(tmp_path / "m.npz")
    assert m.types.tolist() == [1] and m.calibrated
    assert m.training["videos"] == 3 and m.training["heldout_videos"] == 1
