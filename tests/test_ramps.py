"""Ramped onsets (`lhtstream synth --ramp-frames N`): a fault's magnitude grows linearly from
its onset and is complete N frames later; labels say so and `evaluate` reports whether the
fault was alarmed before its ramp ended. Also the whole-pattern drift it is used with."""

from __future__ import annotations

import numpy as np
import pytest

from lhtstream.cli import main
from lhtstream.io.dataset import read_labels
from lhtstream.io.simulate import DEFAULT_MAGNITUDE, Anomaly, simulate_video
from lhtstream.io.simulate.anomalies import RAMPABLE_KINDS
from lhtstream.service.evaluate import VideoResult, summarise

ONSET, RAMP, END = 800, 1000, 2199
FRAMES = 2400


def _pair(kind, magnitude=None):
    mag = DEFAULT_MAGNITUDE[kind] if magnitude is None else magnitude
    base = simulate_video(20, 6, FRAMES, windows=[])
    return base, simulate_video(20, 6, FRAMES, Anomaly(kind, ONSET, END, mag, RAMP), windows=[])


def test_ramp_share_grows_linearly_and_is_complete_after_n_frames():
    r = Anomaly("power_drop", ONSET, END, -0.4, RAMP).ramp()
    assert len(r) == END - ONSET + 1
    assert r[0] == pytest.approx(1 / RAMP) and r[RAMP // 2 - 1] == pytest.approx(0.5)
    assert np.all(r[RAMP - 1:] == 1.0) and np.all(np.diff(r[:RAMP]) > 0)
    # a switch-like fault ignores the ramp; no ramp means full magnitude at the onset
    assert np.all(Anomaly("frame_freeze", ONSET, END, 1.0, RAMP).ramp() == 1.0)
    assert np.all(Anomaly("power_drop", ONSET, END, -0.4).ramp() == 1.0)
    with pytest.raises(ValueError, match="ramp frames"):
        Anomaly("power_drop", ONSET, END, -0.4, -1)


def test_power_ramp_dims_the_heat_gradually():
    base, an = _pair("power_drop")
    assert np.array_equal(an.image[:ONSET], base.image[:ONSET])

    def ratio(a, b):
        return an.image[a:b].astype(float).sum() / base.image[a:b].astype(float).sum()

    m = DEFAULT_MAGNITUDE["power_drop"]
    assert ratio(ONSET, ONSET + 50) == pytest.approx(1.0, abs=0.03)
    assert ratio(ONSET + 475, ONSET + 525) == pytest.approx(1 + m / 2, abs=0.04)
    assert ratio(ONSET + RAMP, END) == pytest.approx(1 + m, abs=0.04)


def test_pattern_drift_moves_the_whole_eight_diagonally():
    base, an = _pair("pattern_drift")
    dx = an.truth["x"] - base.truth["x"]
    dy = an.truth["y"] - base.truth["y"]
    m = DEFAULT_MAGNITUDE["pattern_drift"]
    assert np.all(dx[:ONSET] == 0)
    assert dx[ONSET + RAMP // 2 - 1] == pytest.approx(m / 2 / np.sqrt(2))
    assert np.allclose(dx[ONSET + RAMP:END + 1], m / np.sqrt(2))
    assert np.allclose(dy, dx) and np.all(dx[END + 1:] == 0)
    # without a ramp the pattern jumps at the onset
    jump = simulate_video(20, 6, FRAMES, Anomaly("pattern_drift", ONSET, END, m), windows=[])
    assert jump.truth["x"][ONSET] - base.truth["x"][ONSET] == pytest.approx(m / np.sqrt(2))


@pytest.mark.parametrize("kind", RAMPABLE_KINDS)
def test_drawn_ramped_span_holds_the_whole_ramp(kind):
    v = simulate_video(7, 3, 6000, kind, ramp_frames=3000)
    assert v.anomaly.ramp_frames == 3000
    assert v.anomaly.end_frame - v.anomaly.onset_frame + 1 >= 3000
    assert v.anomaly.onset_frame >= 0.2 * (6000 - 3000)


def test_synth_ramp_frames_labels_and_errors(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", str(out), "--types", "2", "--videos-per-type", "2", "--frames", "3000",
                 "--anomaly-rate", "1", "--anomalies", "power_drop,frame_freeze",
                 "--ramp-frames", "1500"]) == 0
    labels = {lab.kind: lab for lab in read_labels(out).values()}
    assert labels["power_drop"].ramp_frames == 1500
    assert labels["frame_freeze"].ramp_frames == 0  # a switch: not ramped
    assert "ramp_frames" in (out / "labels.csv").read_text().splitlines()[0]
    assert main(["synth", str(tmp_path / "e"), "--types", "2", "--frames", "1000",
                 "--anomaly-rate", "1", "--ramp-frames", "1500"]) == 2
    assert "ramp needs videos of at least 1700 frames" in capsys.readouterr().err


def _result(onset, ramp, raises):
    return VideoResult(type=1, name="0001", kind="power_drop", onset=onset, end=onset + 9000,
                       frames=15000, score=2.0, anomalous=True, raises=raises, ramp_frames=ramp)


def test_evaluate_reports_alarms_before_the_ramp_ended():
    normal = VideoResult(type=1, name="0002", kind="normal", onset=None, end=None,
                         frames=15000, score=0.5, anomalous=False)
    results = [normal,
               _result(3000, 8000, [(3000 + 4700, "intensity_low")]),  # early enough
               _result(3000, 8000, [(3000 + 8000, "intensity_low")]),  # ramp already complete
               _result(3000, 8000, [])]
    k = summarise(results)["per_kind"]["power_drop"]
    assert k["ramp_frames"] == 8000
    assert k["alarmed_before_ramp_end_fraction"] == pytest.approx(1 / 3)
    assert k["delay_before_ramp_end_median"] == 4700
    assert k["detected_any_kind_fraction"] == pytest.approx(2 / 3)
    assert "ramp_frames" not in summarise([normal, _result(3000, 0, [])])["per_kind"]["power_drop"]
