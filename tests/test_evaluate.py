"""`lhtstream evaluate`: the report, its statistics, the KDE-AMD protocol path, and that it
scores exactly what the monitor processes score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lhtstream.base.stats import poisson_upper, roc_auc, roc_curve
from lhtstream.cli import commands, main
from lhtstream.kernels import features as F
from lhtstream.model.kdeamd import NOISE_VARIANCE
from lhtstream.service import evaluate as E
from lhtstream.service import kdeamd_protocol as KP
from tests.processes import ProcessGroup, ipc_endpoint, wait_until

TYPES = [1, 3]  # no obstacle / two obstacle windows
KINDS = "scanner_stall,camera_dropout,power_drop"
FRAMES = 1200


@pytest.fixture(scope="module")
def evalset(tmp_path_factory) -> tuple[Path, Path]:
    """(labelled data set, model trained on a separate normal-only set)."""
    from lhtstream.io.simulate import synthesize
    from lhtstream.service.training import fit_dataset

    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    synthesize(data, types=TYPES, videos_per_type=6, frames=FRAMES, anomaly_rate=0.5,
               anomalies=KINDS.split(","), seed=3)
    train = root / "train"
    # 8 per type: every 4th held out, so 4 held-out videos, enough that thresholds of the
    # groups whose level differs between videos can be calibrated (detector.calibrate)
    synthesize(train, types=TYPES, videos_per_type=8, frames=FRAMES, seed=4)
    model = fit_dataset(train).save(root / "model.npz")
    return data, model


@pytest.fixture(scope="module")
def report(evalset, tmp_path_factory) -> dict:
    data, model = evalset
    out = tmp_path_factory.mktemp("report") / "report.json"
    assert main(["evaluate", str(data), "--model", str(model), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _unit(v) -> bool:
    return v is not None and 0.0 <= v <= 1.0


def test_report_has_every_field_with_sane_values(report, evalset):
    from lhtstream.io.dataset import read_labels

    labels = read_labels(evalset[0])
    n_anom = sum(1 for lab in labels.values() if lab.kind != "normal")
    assert report["videos"] == len(labels) == 12
    assert report["anomalous_videos"] == n_anom and report["normal_videos"] == 12 - n_anom
    assert _unit(report["auc_videos"])
    assert set(report["per_kind"]) == set(KINDS.split(","))
    for kind, k in report["per_kind"].items():
        assert k["videos"] == sum(1 for lab in labels.values() if lab.kind == kind)
        assert _unit(k["detected_fraction"]) and _unit(k["detected_any_kind_fraction"])
        assert k["detected_fraction"] <= k["detected_any_kind_fraction"]
        if k["detected_fraction"] > 0:
            assert 0 <= k["delay_frames_median"] <= k["delay_frames_p95"] <= FRAMES + 100
    # 6 normal videos x 1200 frames = 7.2 s of footage
    assert report["footage_hours"] == pytest.approx(6 * FRAMES / 3.6e6)
    # the false alarms are the raises on the normal videos the report lists (how they turn
    # into rates and bounds is pinned by test_summarise_against_hand_computed_numbers)
    normal_raises = sum(len(v["raises"]) for v in report["video_scores"].values()
                        if v["kind"] == "normal")
    assert report["false_alarms"] == normal_raises
    # these faults are obvious and the normal footage plain: a detector that never fires,
    # or fires everywhere, or a score that does not separate them fails here
    assert report["auc_videos"] >= 0.9
    assert report["verdicts"]["anomalous_flagged_fraction"] >= 0.8
    assert report["verdicts"]["normal_flagged_fraction"] <= 0.2
    assert report["false_alarms"] <= 1
    for kind, k in report["per_kind"].items():
        assert k["detected_fraction"] >= 0.8, (kind, k)
    kp = report["kdeamd_protocol"]
    assert kp["noise_variance_px2"] == 0.02
    assert kp["videos"] == report["normal_videos"] and kp["types"] == 2
    assert _unit(kp["auc"]) and _unit(kp["auc_baseline"]) and _unit(kp["auc_baseline_paper"])
    assert kp["cost_us"] > 0 and kp["cost_us_baseline"] > 0 and kp["cost_us_baseline_paper"] > 0
    assert len(kp["clean_scores"]) == len(kp["noisy_scores"]) == kp["videos"]
    for key in ("clean_scores_baseline", "noisy_scores_baseline", "clean_scores_baseline_paper",
                "noisy_scores_baseline_paper"):
        assert set(kp[key]) == set(kp["clean_scores"]), key  # the same videos
    # the published setting, from the models the folds used
    assert kp["baseline"] == {"method": "KDE-AMD as published", "rows": 35, "cols": 35,
                              "lambda": 15}
    assert kp["baseline_paper"] == {"method": "KDE-AMD, paper-faithful", "rows": 35, "cols": 35,
                                    "lambda": 15}
    text = commands.format_report(report)
    assert "KDE-AMD as published 35x35 l=15" in text and "KDE-AMD paper 35x35 l=15" in text


def test_obvious_faults_are_detected_with_the_right_kind(report):
    for kind in ("scanner_stall", "camera_dropout"):
        k = report["per_kind"][kind]
        assert k["detected_fraction"] == 1.0, (kind, k)
        assert k["delay_frames_median"] <= 50, (kind, k)


def test_stdout_table_and_no_baseline(evalset, capsys):
    data, model = evalset
    assert main(["evaluate", str(data), "--model", str(model), "--types", "1",
                 "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "auc_videos" in out and "scanner_stall" in out and "false alarms" in out
    assert "lhtstream (ours)" in out and "KDE-AMD 35x35" not in out


def test_unlabelled_data_and_unknown_type_are_one_line_errors(evalset, tmp_path, capsys):
    from lhtstream.io.simulate import synthesize

    data, model = evalset
    other = tmp_path / "other"
    synthesize(other, types=[2], videos_per_type=1, frames=200, seed=1)
    assert main(["evaluate", str(other), "--model", str(model)]) == 2
    assert "type(s) [2]" in capsys.readouterr().err
    (other / "labels.csv").unlink()
    assert main(["evaluate", str(other), "--model", str(model)]) == 2
    assert "labels.csv" in capsys.readouterr().err


def test_summarise_against_hand_computed_numbers():
    """Seven videos whose every metric is worked out by hand (frames at 1 kHz)."""
    V = E.VideoResult
    results = [
        V(1, "n1", "normal", None, None, 3600, 0.2, False, []),
        V(1, "n2", "normal", None, None, 3600, 0.5, True, [(100, "trajectory")]),
        V(3, "n3", "normal", None, None, 1800, 0.1, False, []),
        # raised before the onset (not a detection), then trajectory at +10, stall at +30
        V(1, "s1", "scanner_stall", 1000, 1300, 3600, 3.0, True,
          [(990, "trajectory"), (1010, "trajectory"), (1030, "stall")]),
        # raised after end + 100: missed
        V(1, "s2", "scanner_stall", 2000, 2100, 3600, 0.3, False, [(2250, "stall")]),
        V(3, "s3", "scanner_stall", 500, 800, 3600, 2.0, True, [(510, "stall")]),
        # alarmed, but with the wrong kind
        V(3, "p1", "power_drop", 700, 900, 3600, 0.4, False, [(720, "stall")]),
    ]
    r = E.summarise(results)
    assert (r["videos"], r["normal_videos"], r["anomalous_videos"]) == (7, 3, 4)
    # anomalous 3.0, 0.3, 2.0, 0.4 against normal 0.2, 0.5, 0.1: 3 + 2 + 3 + 2 of 12 pairs
    assert r["auc_videos"] == pytest.approx(10 / 12)
    stall = r["per_kind"]["scanner_stall"]
    assert stall["videos"] == 3 and stall["expected_alarm_kind"] == "stall"
    assert stall["detected_fraction"] == pytest.approx(2 / 3)  # s1 (+30), s3 (+10)
    assert stall["detected_any_kind_fraction"] == pytest.approx(2 / 3)  # s1 (+10), s3 (+10)
    assert stall["delay_frames_median"] == 20.0
    assert stall["delay_frames_p95"] == pytest.approx(29.0)  # 10 + 0.95 x (30 - 10)
    assert stall["delay_any_kind_median"] == 10.0
    assert stall["alarms_before_onset"] == 1
    assert stall["alarm_kinds_in_window"] == {"stall": 2, "trajectory": 1}
    assert stall["verdict_anomalous_fraction"] == pytest.approx(2 / 3)
    assert stall["auc_vs_normal"] == pytest.approx(8 / 9)  # 3 + 2 + 3 of 9 pairs
    drop = r["per_kind"]["power_drop"]
    assert (drop["detected_fraction"], drop["detected_any_kind_fraction"]) == (0.0, 1.0)
    assert drop["delay_frames_median"] is None and drop["delay_any_kind_median"] == 20.0
    assert drop["auc_vs_normal"] == pytest.approx(2 / 3)
    # false alarms: one raise in 9000 normal frames = 9 s = 0.0025 h of footage
    assert r["false_alarms"] == 1 and r["false_alarms_by_kind"] == {"trajectory": 1}
    assert r["footage_hours"] == pytest.approx(0.0025)
    assert r["false_alarms_per_hour"] == pytest.approx(400.0)
    # one event: the 95 % upper Poisson bound is 4.744 events (standard table value)
    assert r["false_alarms_per_hour_upper95"] == pytest.approx(4.744 / 0.0025, rel=1e-3)
    assert r["normal_videos_with_alarms"] == 1
    assert r["verdicts"] == {"normal_flagged_fraction": pytest.approx(1 / 3),
                             "anomalous_flagged_fraction": 0.5}


def test_roc_auc_equals_pairwise_count():
    rng = np.random.default_rng(5)
    for _ in range(20):
        neg = np.round(rng.normal(0, 1, rng.integers(1, 30)), 1)  # rounding makes ties
        pos = np.round(rng.normal(0.7, 1, rng.integers(1, 30)), 1)
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        assert roc_auc(neg, pos) == pytest.approx(wins / (len(neg) * len(pos)))
    fpr, tpr = roc_curve([0.1, 0.2], [0.3, 0.4])
    assert np.trapezoid(tpr, fpr) == pytest.approx(1.0)


def test_poisson_upper_bound():
    # zero events: P(0; lam) = exp(-lam) = 0.05 -> lam = ln 20
    assert poisson_upper(0) == pytest.approx(math.log(20.0), rel=1e-6)
    # k = 1: (1 + lam) exp(-lam) = 0.05 -> lam ~ 4.744 (standard table value)
    assert poisson_upper(1) == pytest.approx(4.744, abs=1e-3)


def test_detection_window_kinds_and_delays():
    r = E.VideoResult(1, "0001", "scanner_stall", onset=500, end=800, frames=2000, score=0.0,
                      anomalous=True,
                      raises=[(100, "trajectory"), (510, "trajectory"), (530, "stall"),
                              (950, "stall")])
    d = E.detection(r, "stall")
    assert d == {"right": 30, "any": 10, "before_onset": 1}
    late = E.VideoResult(1, "0002", "scanner_stall", 500, 800, 2000, 0.0, False,
                         [(901, "stall")])
    assert E.detection(late, "stall")["right"] is None  # after end + 100
    at_edge = E.VideoResult(1, "0003", "scanner_stall", 500, 800, 2000, 0.0, False,
                            [(900, "stall")])
    assert E.detection(at_edge, "stall")["right"] == 400


def test_protocol_perturbs_positions_by_the_published_noise(evalset, monkeypatch):
    """What our model is scored on: clean measurements, then the same with the published
    noise sequence of each variance on X/Y only, for every normal video, one fold each."""
    from lhtstream.io.dataset import Dataset, read_labels
    from lhtstream.model.kdeamd_published import published_noise

    data, _ = evalset
    labels = read_labels(data)
    videos = [v for v in Dataset(data).videos(types=[1])
              if labels[(v.type, v.name)].kind == "normal"]
    seen: dict[str, list[np.ndarray]] = {}
    real = KP.score_measured

    def spy(model, video, timings=None, offset=0):
        seen.setdefault(video.name, []).append(np.array(video.measurements))
        return real(model, video, timings, offset)

    monkeypatch.setattr(KP, "score_measured", spy)
    out = KP.kdeamd_protocol(videos, baseline=False, variances=(NOISE_VARIANCE, 0.005))
    assert out["videos"] == len(videos) == 3
    assert out["noise_variances_px2"] == [NOISE_VARIANCE, 0.005]
    assert [r["noise_variance_px2"] for r in out["levels"]] == [NOISE_VARIANCE, 0.005]
    assert out["levels"][0]["auc"] == out["auc"] and _unit(out["levels"][1]["auc"])
    other = [c for c in F.MEASURED if c not in (F.X, F.Y)]
    for v in videos:
        clean, *noisy = seen[v.name]
        assert len(noisy) == 2  # one scoring per level, after the clean one
        assert np.array_equal(clean, F.measure_video(v.load()), equal_nan=True)
        ok = np.isfinite(clean[:, F.X])
        for got, var in zip(noisy, (NOISE_VARIANCE, 0.005), strict=True):
            assert np.array_equal(clean[:, other], got[:, other], equal_nan=True)
            # as published: the same sequence for every video (seeded with 0 each time)
            want = published_noise(len(clean), math.sqrt(var))
            np.testing.assert_allclose((got - clean)[ok][:, [F.X, F.Y]], want[ok], atol=1e-9)
            assert want.var(axis=0) == pytest.approx([var] * 2, rel=0.06)


def test_protocol_noise_option_is_checked_before_any_work(evalset, capsys):
    data, model = evalset
    for bad, why in (("0.02,abc", "give variances in px^2"), ("0.02,-1", "outside (0, 1]"),
                     ("0.02,0.02", "repeat")):
        assert main(["evaluate", str(data), "--model", str(model), "--protocol-noise", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err


def test_plots_need_matplotlib(evalset, tmp_path, capsys):
    data, model = evalset
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code = main(["evaluate", str(data), "--model", str(model), "--plots", str(tmp_path)])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install" in err[0]
        return
    assert main(["evaluate", str(data), "--model", str(model), "--types", "1",
                 "--no-baseline", "--plots", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "roc.png" in pngs and len(pngs) >= 2
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_monitor_processes_give_the_same_verdict_and_alarms(evalset, report, tmp_path):
    """replay -> monitor (real processes, ZeroMQ, journal) on one anomalous video: the
    journaled verdict score equals evaluate's to the bit, and so do the alarm raises."""
    from lhtstream.io.journal import Journal

    data, model = evalset
    name = next(k.split("/")[1] for k, v in report["video_scores"].items()
                if k.startswith("1/") and v["kind"] == "scanner_stall")
    expected = report["video_scores"][f"1/{name}"]
    frames_ep, pub_ep = ipc_endpoint(tmp_path, "frames"), ipc_endpoint(tmp_path, "pub")
    journal = tmp_path / "journal.sqlite"
    with ProcessGroup() as procs:
        mon = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep, "--model", model,
                        "--journal", journal, cwd=tmp_path)
        mon.wait_for_stderr(r"ready in", timeout=120)
        replay = procs.cli("replay", data, "--endpoint", frames_ep, "--types", "1",
                           "--videos", name, "--rate", "max")
        assert replay.wait(timeout=60) == 0, replay.stderr

        def verdicts():
            with Journal(journal, writer=False) as j:
                return j.verdicts()

        got = wait_until(verdicts, timeout=30)
        with Journal(journal, writer=False) as j:
            alarms = j.alarms()
        assert mon.terminate() == 0
    assert len(got) == 1
    assert got[0]["video"] == name and got[0]["frames"] == FRAMES
    assert got[0]["score"] == expected["score"]  # same code path: identical float
    assert got[0]["anomalous"] == expected["anomalous"]
    raised = [[a["frame"], a["kind"]] for a in alarms if a["state"] == "raise"]
    assert raised == expected["raises"] and raised
