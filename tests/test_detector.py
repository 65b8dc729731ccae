"""Detector: hysteresis, kinds, sensor separation, threshold calibration (constructed scores)."""

from __future__ import annotations

import math

import numpy as np

from lhtstream.io.simulate import ANOMALY_KINDS, SENSOR_KINDS
from lhtstream.model.detector import (
    ALARM_KIND_FOR_ANOMALY,
    ALARM_KINDS,
    DEFAULT_CLEAR_FRAMES,
    Detector,
    tail_threshold,
)
from lhtstream.model.normality import COMB, INT_LOW, MOVE, N_GROUPS, SENSOR, SLIP, STALL, TRAJ


def _det() -> Detector:
    raise_thr = np.full(N_GROUPS, 5.0)
    clear_thr = np.full(N_GROUPS, 3.0)
    raise_thr[SENSOR], clear_thr[SENSOR] = 0.45, 0.2
    return Detector(raise_thr, clear_thr, video_thr=1.0)


def _normal() -> np.ndarray:
    s = np.zeros(N_GROUPS)
    s[TRAJ] = s[TRAJ + 1] = 2.0
    return s


def test_every_anomaly_kind_maps_to_an_alarm_kind_and_sensor_faults_to_sensor():
    assert set(ALARM_KIND_FOR_ANOMALY) == set(ANOMALY_KINDS)
    assert set(ALARM_KIND_FOR_ANOMALY.values()) <= set(ALARM_KINDS)
    for kind, alarm in ALARM_KIND_FOR_ANOMALY.items():
        assert (alarm == "sensor") == (kind in SENSOR_KINDS)


def test_raise_then_clear_with_hysteresis():
    d = _det()
    s = _normal()
    for _ in range(50):
        assert d.step(s, 1) == 0
    s[INT_LOW] = 8.0
    raised_at = None
    for i in range(20):
        if d.step(s, 1):
            raised_at = i
            break
    assert raised_at is not None and raised_at <= 5
    assert d.changed[ALARM_KINDS.index("intensity_low")] == 1
    # between clear and raise thresholds: stays active
    s[INT_LOW] = 4.0
    for _ in range(100):
        assert d.step(s, 1) == 0
    s[INT_LOW] = 0.0
    cleared = [i for i in range(300) if d.step(s, 1)]
    assert len(cleared) == 1 and cleared[0] >= DEFAULT_CLEAR_FRAMES - 1  # quiet frames first
    assert not d.any_active and d.process_alarms == 1 and d.anomalous()


def test_one_raise_per_kind_per_episode_and_clear_when_the_process_is_normal():
    # A stall-like episode: the stall group stays high while intensity_low comes
    # and goes in bursts with gaps shorter than the clear hold -> one raise per kind.
    d = _det()
    s = _normal()
    for _ in range(150):
        d.step(s, 1)
    raises: list[str] = []
    clears: list[tuple[int, str]] = []

    def run(frames: int, t0: int) -> None:
        for i in range(frames):
            if d.step(s, 1):
                for k in np.flatnonzero(d.changed):
                    if d.changed[k] > 0:
                        raises.append(ALARM_KINDS[k])
                    else:
                        clears.append((t0 + i, ALARM_KINDS[k]))

    s[STALL] = 10.0
    t = 0
    for _ in range(6):
        s[INT_LOW] = 8.0
        run(30, t)
        t += 30
        # intensity_low below its clear level for longer than the hold, but the
        # stall still holds the episode open
        s[INT_LOW] = 0.0
        run(DEFAULT_CLEAR_FRAMES + 50, t)
        t += DEFAULT_CLEAR_FRAMES + 50
    assert sorted(raises) == ["intensity_low", "stall"]
    assert clears == []
    # back to normal: both clear, after the hold and not much later
    end = t
    s[STALL] = 0.0
    run(400, t)
    assert sorted(k for _, k in clears) == ["intensity_low", "stall"]
    for f, _ in clears:
        assert DEFAULT_CLEAR_FRAMES <= f - end <= DEFAULT_CLEAR_FRAMES + 30
    assert not d.any_active


def test_unjudged_frames_do_not_move_process_scores_and_sensor_blocks_process_alarms():
    d = _det()
    s = _normal()
    s[INT_LOW] = 50.0
    s[SENSOR] = 1.0
    events = [d.step(s, 0) for _ in range(10)]  # blank frames: only the sensor group counts
    assert sum(events) == 1 and d.active[ALARM_KINDS.index("sensor")] == 1
    assert d.active[ALARM_KINDS.index("intensity_low")] == 0
    assert d.smooth[INT_LOW] == 0.0


def test_lost_frames_raise_sensor_once():
    d = _det()
    assert d.lost(3) is True
    assert d.lost(2) is False
    assert d.process_alarms == 0


def _spiky_videos(videos: int, rng) -> list:
    """Videos of 10,000 frames at 0 with a spike of height Exp(1) every 1000 frames: the
    level exceeded at rate r per hour is ln(spikes per hour / r)."""
    out = []
    for _ in range(videos):
        v = np.zeros(10_000)
        v[500::1000] = rng.exponential(1.0, 10)
        out.append(v)
    return out


def test_tail_threshold_extrapolates_beyond_the_sample_and_widens_with_less_footage():
    rng = np.random.default_rng(0)
    big = _spiky_videos(50, rng)
    hours = 50 * 10_000 / 3.6e6
    thr, k = tail_threshold(big, hours, 1.0)
    assert k == 500  # every spike is one excursion
    true_level = np.log(500 / hours)  # exceeded once an hour: ~8.2
    assert thr > max(v.max() for v in big)  # beyond anything seen (~7)
    assert true_level < thr < true_level + 2.0  # conservative, by the confidence bounds
    # a tenth of the footage: the same process, a wider threshold (fewer excursions seen)
    small, _ = tail_threshold(big[:5], hours / 10, 1.0)
    assert small > thr + 0.5
    # too few excursions to say anything: not judged
    assert tail_threshold([big[0][:3000]], hours / 500 * 3, 1.0)[0] == np.inf


def test_cycle_comb_groups_raise_trajectory_and_frequency():
    for group, kind in ((COMB, "trajectory"), (SLIP, "frequency")):
        d = _det()
        s = _normal()
        s[COMB] = 2.0
        for _ in range(30):
            assert d.step(s, 1) == 0
        s[group] = 25.0
        raised = [i for i in range(20) if d.step(s, 1)]
        assert raised and raised[0] <= 5
        assert [ALARM_KINDS[k] for k in range(len(ALARM_KINDS)) if d.active[k]] == [kind]


def test_verdict_score_is_largest_evidence_relative_to_its_threshold():
    # a group held below its raise threshold (5): score = level / threshold < 1
    d = _det()
    s = _normal()
    s[INT_LOW] = 4.0
    for _ in range(200):
        d.step(s, 1)
    assert abs(d.video_score - 0.8) < 1e-6 and not d.anomalous()
    # above it: an alarm, and the score says by how much (peak 6 / 5)
    s[INT_LOW] = 6.0
    for _ in range(200):
        d.step(s, 1)
    assert abs(d.video_score - 1.2) < 1e-6 and d.anomalous() and d.process_alarms == 1
    s[INT_LOW] = 0.0
    for _ in range(200):
        d.step(s, 1)
    assert abs(d.video_score - 1.2) < 1e-6  # the peak is remembered to the end of the video


def test_verdict_mean_statistic_relative_to_video_threshold_not_trajectory_peaks():
    d = _det()  # video threshold 1.0, raise thresholds 5
    s = _normal()
    s[TRAJ] = s[MOVE] = 2.75  # mean excess (2.75 + 2.75 - 4) = 1.5 per frame
    for _ in range(300):
        d.step(s, 1)
    assert abs(d.video_score - 1.5) < 1e-6 and d.anomalous()
    # a brief trajectory burst past its raise threshold is trajectory evidence through the
    # mean only (its peaks follow the video's pattern size)
    d = _det()
    s = _normal()
    for i in range(1000):
        s[TRAJ] = 40.0 if i < 20 else 2.0
        d.step(s, 1)
    assert d.peak[TRAJ] > 1.0
    assert abs(d.video_score - (38.0 * 20 / 1000)) < 1e-6


def test_sensor_fault_makes_the_verdict_anomalous_without_process_alarm():
    d = _det()
    s = _normal()
    for _ in range(100):
        d.step(s, 1)
    assert d.video_score < 1.0 and not d.anomalous()
    s[SENSOR] = 1.0
    for _ in range(5):  # five blank frames
        d.step(s, 0)
    assert d.process_alarms == 0 and d.active[ALARM_KINDS.index("sensor")] == 1
    assert d.video_score > 1.0 and d.anomalous()
    d = _det()
    d.lost(3)  # frames lost in transport count the same way
    assert d.video_score >= 1.0 / 0.45 - 1e-9 and d.anomalous()


def test_kind_levels_give_each_kind_its_strongest_group_relative_to_its_threshold():
    d = _det()
    s = _normal()
    s[SLIP] = 8.0  # frequency's second group, threshold 5.0
    for _ in range(200):  # EWMA settles on the score
        d.step(s, 1)
    levels = d.kind_levels()
    assert list(levels) == list(ALARM_KINDS)
    assert abs(levels["frequency"] - 8.0 / 5.0) < 1e-6
    assert levels["frequency"] > 1.0 and d.active[ALARM_KINDS.index("frequency")] == 1
    assert abs(levels["trajectory"] - 2.0 / 5.0) < 1e-6  # trajectory/move at their normal 2.0
    assert abs(levels["sensor"]) < 1e-9


def test_student_t_quantiles_against_the_tables():
    # two-sided tables: t(0.975; 5) = 2.5706, t(0.999; 10) = 4.1437, t(0.95; 1) = 6.3138;
    # a large dof is the normal quantile; dof 2 in closed form: t = sqrt(2 / (4p(1-p)) - 2)
    from lhtstream.base.stats import student_t_upper

    assert abs(student_t_upper(0.025, 5) - 2.5706) < 1e-4
    assert abs(student_t_upper(0.001, 10) - 4.1437) < 1e-4
    assert abs(student_t_upper(0.05, 1) - 6.3138) < 1e-4
    assert abs(student_t_upper(0.05, 1e6) - 1.6449) < 1e-4
    p = 1.85e-4
    assert abs(student_t_upper(p, 2) - math.sqrt(2 / (4 * p * (1 - p)) - 2)) < 1e-6


def test_prediction_bound_of_a_new_video_widens_with_fewer_videos():
    """The next video's peak: mean + t sd sqrt(1 + 1/n), so three held-out videos bound it
    far above their own maximum, thirty barely above theirs; one cannot bound it."""
    from lhtstream.base.stats import prediction_upper

    rng = np.random.default_rng(3)
    peaks = rng.normal(10.0, 1.0, size=30)
    few, many = prediction_upper(peaks[:3], 1e-4), prediction_upper(peaks, 1e-4)
    assert few > peaks[:3].max() + 20  # t(1e-4; 2) = 70.7
    assert peaks.max() < many < peaks.mean() + 5.0 * peaks.std(ddof=1)
    assert prediction_upper(peaks[:1], 1e-4) == math.inf
