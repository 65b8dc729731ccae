"""Detector: per-frame group scores -> alarms (with kinds and hysteresis) and verdicts.

Each score group (`lhtstream.model.normality.GROUPS`) is smoothed by an EWMA with
weight `alpha` (default 0.2: a time constant of ~5 frames, half a scan
cycle, so a fault shows within two cycles). Process groups only advance on
frames the model could judge (not empty/repeated, past warm-up); the sensor
group advances on every frame. An alarm kind is *raised* when one of its
groups' smoothed score exceeds its raise threshold. A process kind is *cleared*
when ALL process groups stayed below their clear thresholds for `clear_frames`
frames (default 100 = 10 scan cycles): one raise per kind per fault episode, a
clear when the process is back to normal (per-kind clearing after 10 frames
re-raised e.g. `intensity_low` up to 10 times in one stall). The sensor kind
clears on its own group alone.
Process alarms are not raised while a sensor alarm is active (a blank camera
says nothing about the process).

Thresholds are calibrated by `calibrate` on normal videos held out from
training, per group: the smoothed scores of every held-out video are cut into
*excursions* above their pooled 99th percentile u (lower where that leaves fewer
than 5 excursions; runs above u less than
`CLUSTER_GAP` frames apart are one excursion: one alarm), one peak each. The
peaks' excess over u is modelled as exponential (peaks over threshold), and
the raise threshold is the level whose excursions would happen `fa_per_hour`
/ (number of judged groups) times per hour: any group raising is a false
alarm, so the groups share the promise. Both estimates are taken at their one-sided 95 % confidence
bound for the number of excursions seen (`gamma_lower`, `poisson_upper`), so a
small held-out set gives wider thresholds, never narrower ones; and excursions,
not frames, are what is counted, because consecutive frames (and the frames of
one video, whose level is that video's) are not independent draws. No hand-set
floors: a threshold above what the group's score can ever reach (its clip) is
reported as `unreachable` and the group is not judged, and so is every group
that held-out footage cannot calibrate (see `calibrate`'s `population`). The
clear threshold is half-way between the held-out median and the raise threshold.
The sensor group's raise level is not statistical: 0.45, about 3 blank or
frozen frames in a row.

Verdict: one video-level score on a threshold scale (1.0 = at a threshold), the
largest of
- the video-mean statistic (mean over judged frames of trajectory + move - 4,
  the excess of the position/move squared Mahalanobis distances over their
  normal expectation: the subtle whole-video evidence the KDE-AMD protocol
  measures) / the calibrated video threshold, and
- for every group but trajectory/move (whose sum is the mean statistic and whose
  peaks follow the video's pattern size), the peak smoothed score / its raise
  threshold: > 1 exactly when that group crossed its alarm level. The sensor
  group (and lost frames) counts: footage with camera faults does not verify a
  workpiece as good; `Verdict.kinds` says it was the sensor.
A video is `anomalous` when the score exceeds 1 or any process alarm was raised.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lhtstream.base.stats import gamma_lower, poisson_upper, prediction_upper
from lhtstream.io.events import Alarm, Verdict
from lhtstream.kernels.detection import (
    ALARM_KINDS,
    DET,
    K_SENSOR,
    KIND_OF_GROUP,
    N_KINDS,
    VIDEO_FIELDS,
    VIDEO_SCORE_EXPECTED,
    count_raises,
    detect_step,
    smooth_rows,
)
from lhtstream.kernels.scoring import (
    CHANGE_CLIP,
    CHANGE_GROUPS,
    CHANGE_Z_CLIP,
    COMB,
    COMB_CLIP,
    D2_CLIP,
    FREQ,
    GROUPS,
    IMAGE,
    IMAGE_CHANGE,
    IMAGE_CLIP,
    INT_FALL,
    INT_HIGH,
    INT_LOW,
    INT_RISE,
    LEVEL_CLIP,
    MOVE,
    N_GROUPS,
    N_IMAGE,
    POS_CHANGE,
    SENSOR,
    SIZE,
    SIZE_CHANGE,
    SLIP,
    SLIP_CLIP,
    STALL,
    STALL_CLIP,
    TRAJ,
    Z_CLIP,
)
from lhtstream.model.normality import NormalityModel

__all__ = ["ALARM_KINDS", "K_SENSOR", "KIND_OF_GROUP", "N_KINDS", "Alarm", "Verdict",
           "Detector", "POPULATION_GROUPS", "SINGLE_VIDEO_GROUPS", "calibrate",
           "smoothed_scores", "tail_threshold"]

#: The score groups of each alarm kind (indices into GROUPS).
GROUPS_OF_KIND: tuple[np.ndarray, ...] = tuple(
    np.flatnonzero(KIND_OF_GROUP == k) for k in range(N_KINDS))

#: The alarm kind each simulator anomaly kind should raise.
ALARM_KIND_FOR_ANOMALY: dict[str, str] = {
    "position_noise": "trajectory",
    "power_drop": "intensity_low",
    "power_spike": "intensity_high",
    "scanner_stall": "stall",
    "pattern_shrink": "trajectory",
    "frequency_drift": "frequency",
    "spot_defocus": "spot_size",
    "obstacle_pattern_misplaced": "trajectory",
    "camera_dropout": "sensor",
    "frame_freeze": "sensor",
    "pattern_drift": "trajectory",
}

DEFAULT_ALPHA = 0.2
# Per-group EWMA weights: trajectory/move average over ~2 cycles (their per-frame
# scores are chi2-distributed and heavy-tailed), the rest over half a cycle; the change
# groups are an EWMA of the residual itself (scoring.CHANGE_ALPHA), passed through.
DEFAULT_ALPHAS = np.full(N_GROUPS, DEFAULT_ALPHA)
DEFAULT_ALPHAS[TRAJ] = DEFAULT_ALPHAS[MOVE] = DEFAULT_ALPHAS[COMB] = DEFAULT_ALPHAS[IMAGE] = 0.1
DEFAULT_ALPHAS[list(CHANGE_GROUPS)] = 1.0
DEFAULT_CLEAR_FRAMES = 100
FRAMES_PER_HOUR = 3_600_000.0
TAIL_QUANTILES = (0.99, 0.98, 0.95, 0.9, 0.8, 0.5)  # tried in turn, see tail_threshold
MIN_EXCURSIONS = 5  # below this even the confidence bounds say little
CLUSTER_GAP = 100  # frames: excursions closer than this are one alarm (the clear hold)
CONFIDENCE = 0.95  # of the bounds a threshold is computed from
SENSOR_RAISE = 0.45  # ~3 consecutive blank frames through the 0.2 EWMA
#: The highest smoothed score each group can reach (its per-frame clip).
ATTAINABLE = np.full(N_GROUPS, Z_CLIP)  # frequency
ATTAINABLE[[INT_LOW, INT_HIGH, SIZE]] = LEVEL_CLIP
ATTAINABLE[STALL] = STALL_CLIP
ATTAINABLE[[TRAJ, MOVE]] = D2_CLIP
ATTAINABLE[IMAGE] = IMAGE_CLIP
ATTAINABLE[COMB] = COMB_CLIP
ATTAINABLE[SLIP] = SLIP_CLIP
ATTAINABLE[[POS_CHANGE, IMAGE_CHANGE]] = CHANGE_CLIP
ATTAINABLE[[INT_FALL, INT_RISE, SIZE_CHANGE]] = CHANGE_Z_CLIP
ATTAINABLE[SENSOR] = 1.0
#: Groups whose level differs between normal videos (laser power, spot size, placement,
#: scanner frequency): only held-out footage from videos not trained on can calibrate them.
POPULATION_GROUPS = (TRAJ, MOVE, INT_LOW, INT_HIGH, SIZE, FREQ, SLIP, IMAGE)
#: Groups the end of the training videos themselves can calibrate: a stopped spot, and the
#: cycle comb (geometry-free: its noise is the scanner's jitter). The change groups compare
#: a video with its own past, but how much a video varies within itself differs from video
#: to video too (measured: a self-calibrated model's size_change, learned from one video,
#: raised 53 false alarms in 0.3 h of the next ones), so they need other videos as well.
SINGLE_VIDEO_GROUPS = (STALL, COMB)
#: Groups that are a z against the model's own (within + between video) spread: a normal
#: video's smoothed level is at most N(0, 1) by construction, and mostly it is the video's
#: own level, so their excursions are few per video (see `nominal_threshold`).
LEVEL_Z_GROUPS = (INT_LOW, INT_HIGH, SIZE, STALL, FREQ)
MIN_POPULATION_HELDOUT = 3  # held-out videos the POPULATION_GROUPS need at least
VIDEO_FRAMES = 15_000  # a real video's length (~15 s): one level excursion per video at most
# Neutral (normal-expectation) level of each group: where smoothing starts.
NEUTRAL = np.zeros(N_GROUPS)
NEUTRAL[[TRAJ, MOVE, COMB, IMAGE, POS_CHANGE]] = 2.0
NEUTRAL[IMAGE_CHANGE] = float(N_IMAGE)
# Lowest video threshold (units of the mean statistic, excess chi2 per frame): a held-out
# set of a few videos (a KDE-AMD protocol fold: 3, in-sample) underestimates how much
# the statistic varies between videos of different geometry (a full model: ~18).
VIDEO_THR_FLOOR = 3.0
# Groups whose peak enters the verdict score. Not trajectory/move: their sum is the mean
# statistic already, and their peaks follow a video's pattern size (which varies between
# normal videos); the cycle comb measures the trajectory free of geometry.
VERDICT_PEAK = np.ones(N_GROUPS, dtype=bool)
VERDICT_PEAK[TRAJ] = VERDICT_PEAK[MOVE] = False


# ------------------------------------------------------------------ detector


class Detector:
    """Hysteresis alarms over smoothed group scores for one stream (see module doc)."""

    def __init__(self, raise_thr: np.ndarray, clear_thr: np.ndarray, video_thr: float,
                 alpha: np.ndarray | None = None,
                 clear_frames: int = DEFAULT_CLEAR_FRAMES,
                 state: np.ndarray | None = None) -> None:
        """`state`: a float64 array laid out as `DET` to keep the detector in (a slice of
        a stream's state, so the fused per-frame kernel steps it); a private one if None."""
        self.state = np.zeros(DET.size) if state is None else state
        if self.state.shape != (DET.size,) or self.state.dtype != np.float64:
            raise ValueError(f"detector state must be float64 ({DET.size},)")
        st = self.state
        self.smooth = DET.part(st, "smooth")
        self.peak = DET.part(st, "peak")
        self.raise_thr = DET.part(st, "raise")
        self.clear_thr = DET.part(st, "clear")
        self.alpha = DET.part(st, "alpha")
        self.active = DET.part(st, "active")
        self.quiet = DET.part(st, "quiet")
        self.changed = DET.part(st, "changed")
        self.which = DET.part(st, "which")
        self.raise_thr[:] = raise_thr
        self.clear_thr[:] = clear_thr
        self.alpha[:] = DEFAULT_ALPHAS if alpha is None else alpha
        self.video_thr = float(video_thr)
        self.clear_frames = int(clear_frames)
        DET.set(st, clear_frames=self.clear_frames)
        self.kinds_raised: set[str] = set()
        self.reset()

    @classmethod
    def for_model(cls, model: NormalityModel, type_id: int, **kw: Any) -> Detector:
        s = model.slot(type_id)
        if s < 0:
            raise KeyError(type_id)
        return cls(model.raise_thr[s], model.clear_thr[s], float(model.video_thr[s]), **kw)

    def reset(self) -> None:
        """New video: zero the smoothing, alarms and verdict accumulators."""
        self.smooth[:] = NEUTRAL
        DET.set(self.state, **dict.fromkeys(VIDEO_FIELDS, 0.0))  # kinds, verdict accumulators
        self.kinds_raised = set()

    def step(self, scores: np.ndarray, scored: int) -> int:
        """One frame's scores (and whether the process groups were judged) -> #kind changes.

        After a non-zero return, `changed[k]` is +1/-1 for raised/cleared kinds.
        """
        return detect_step(scores, scored, self.state)

    def lost(self, n: int) -> bool:
        """`n` frames lost in transport: force the sensor kind; True if newly raised."""
        self.smooth[SENSOR] = max(self.smooth[SENSOR], 1.0)
        self.peak[SENSOR] = max(self.peak[SENSOR], self.smooth[SENSOR] / self.raise_thr[SENSOR])
        self.quiet[K_SENSOR] = 0
        if self.active[K_SENSOR]:
            return False
        self.active[K_SENSOR] = 1
        return True

    @property
    def any_active(self) -> bool:
        return bool(self.active.any())

    @property
    def video_mean(self) -> float:
        """Mean over judged frames of (trajectory + move - 4): the subtle, whole-video
        position statistic (0 on average for a normal video)."""
        v = DET.view(self.state)
        return v.vsum / v.vn if v.vn > 0 else 0.0

    @property
    def evidence(self) -> dict[str, float]:
        """The verdict's parts, each relative to its threshold (1.0 = at the threshold):
        ``mean`` = video_mean / video threshold, and per group the peak smoothed score /
        its raise threshold."""
        out = {"mean": self.video_mean / self.video_thr}
        for g, name in enumerate(GROUPS):
            out[name] = float(self.peak[g])
        return out

    @property
    def video_score(self) -> float:
        """Verdict score, 1.0 = at a threshold: the largest of the video-mean statistic
        relative to the video threshold and the peak smoothed score relative to its raise
        threshold of every group but trajectory/move (so > 1 when any other group raised
        an alarm, sensor included)."""
        return max(self.video_mean / self.video_thr, float(self.peak[VERDICT_PEAK].max()))

    def kind_levels(self) -> dict[str, float]:
        """Each alarm kind's evidence now, relative to its raise threshold (1.0 = the kind
        raises): the largest smoothed score / raise threshold among the kind's groups."""
        ratio = self.smooth / self.raise_thr
        return {kind: float(ratio[g].max()) for kind, g in zip(ALARM_KINDS, GROUPS_OF_KIND,
                                                               strict=True)}

    @property
    def process_alarms(self) -> int:
        return int(DET.view(self.state).nraised)

    def anomalous(self) -> bool:
        return self.video_score > 1.0 or self.process_alarms > 0


# ------------------------------------------------------------------ calibration


def smoothed_scores(model: NormalityModel, type_id: int, rows: np.ndarray,
                    alpha: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw scores, judged flags, smoothed scores) of one video, as the pipeline computes them."""
    scores, scored = model.score_rows(type_id, rows)
    smooth = NEUTRAL.copy()
    out = np.zeros_like(scores)
    alpha = np.array(DEFAULT_ALPHAS if alpha is None else alpha, dtype=np.float64)
    smooth_rows(scores, scored, alpha, smooth, out)
    return scores, scored, out


def _excursion_peaks(series: list[np.ndarray], u: float) -> np.ndarray:
    """Peak of every excursion above `u` in each video's series (runs less than
    CLUSTER_GAP frames apart merged: the detector would raise once)."""
    peaks = []
    for v in series:
        idx = np.flatnonzero(v > u)
        if len(idx) == 0:
            continue
        starts = np.concatenate(([0], np.flatnonzero(np.diff(idx) > CLUSTER_GAP) + 1))
        ends = np.concatenate((starts[1:], [len(idx)]))
        for a, b in zip(starts, ends, strict=True):
            peaks.append(float(v[idx[a]:idx[b - 1] + 1].max()))
    return np.array(peaks)


def tail_threshold(series: list[np.ndarray], hours: float, fa_per_hour: float,
                   confidence: float = CONFIDENCE) -> tuple[float, int]:
    """Raise level whose excursions happen `fa_per_hour` per hour of footage like the
    held-out `series` (one array of smoothed scores per video, `hours` of footage in all),
    at the `confidence` bound of what they show; and the number of excursions it rests on.

    Excursions above u (the pooled 99th percentile, or a lower one where that leaves fewer
    than MIN_EXCURSIONS) are counted per video with
    `_excursion_peaks`; their rate per hour is bounded above by `poisson_upper` and the
    mean excess of their peaks (exponential tail) by `gamma_lower`; the level is
    u + excess * ln(rate / fa_per_hour). With fewer than MIN_EXCURSIONS even above the
    median, the footage cannot say how far the score may go: inf (see `calibrate`).
    """
    pooled = np.concatenate(series) if series else np.zeros(0)
    if len(pooled) == 0 or hours <= 0:
        return math.inf, 0
    # u: the 99th percentile, lowered until the tail rests on MIN_EXCURSIONS excursions
    # (a score whose level is mostly its video's has few excursions per video)
    for q in TAIL_QUANTILES:
        u = float(np.quantile(pooled, q))
        peaks = _excursion_peaks(series, u)
        if len(peaks) >= MIN_EXCURSIONS:
            break
    vmax = float(pooled.max())
    if len(peaks) < MIN_EXCURSIONS:  # too few to say how far the score may go
        return math.inf, len(peaks)
    beta_up = float((peaks - u).sum()) / gamma_lower(len(peaks), confidence)
    rate_up = poisson_upper(len(peaks), confidence) / hours
    level = u + beta_up * math.log(max(rate_up / fa_per_hour, 1.0))
    return max(level, vmax + 1e-6 * max(abs(vmax), 1.0)), len(peaks)


def nominal_threshold(group: int, fa_per_hour: float) -> float:
    """The level a `LEVEL_Z_GROUPS` score would exceed `fa_per_hour` times an hour if the
    model's spread were right: one excursion per `VIDEO_FRAMES` video at most, a standard
    normal level, so the one-sided normal quantile at fa_per_hour per video-length; 0 for
    other groups (their scores vary within a video, and held-out footage shows their tail)."""
    if group not in LEVEL_Z_GROUPS:
        return 0.0
    p = min(fa_per_hour * VIDEO_FRAMES / FRAMES_PER_HOUR, 0.5)
    return float(_normal_quantile(1.0 - p))


def _normal_quantile(q: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < q:
            lo = mid
        else:
            hi = mid
    return lo


def calibrate(model: NormalityModel, heldout: list[tuple[int, np.ndarray]],
              fa_per_hour: float = 1.0, alpha: np.ndarray | None = None,
              clear_frames: int = DEFAULT_CLEAR_FRAMES,
              population: bool = True) -> dict[str, Any]:
    """Set the model's raise/clear/video thresholds from held-out normal videos.

    Thresholds are pooled over types (scores are already normalised per cell).
    `population`: whether the held-out videos are other videos than the training
    ones (and the model knows the spread between videos, `training["between_video_
    dof"]` >= 1, and there are MIN_POPULATION_HELDOUT of them at least). If not (a stream
    calibrating on the end of the videos it trained on) only the `SINGLE_VIDEO_GROUPS`
    (and the sensor) are judged, the others' threshold is inf: how they vary differs
    from video to video by more than the footage can show. Returns (and stores in
    `model.calibration`) what was set and how many alarms the held-out footage itself
    raises with them.
    """
    if not heldout:
        raise ValueError("calibration needs at least one held-out normal video")
    per_group: list[list[np.ndarray]] = [[] for _ in range(N_GROUPS)]
    video_scores = []
    cache = []
    for t, rows in heldout:
        scores, scored, sm = smoothed_scores(model, t, rows, alpha)
        ok = scored.astype(bool)
        for g in range(N_GROUPS):
            per_group[g].append(sm[:, g] if g == SENSOR else sm[ok, g])
        n = ok.sum()
        video_scores.append(float((scores[ok, TRAJ] + scores[ok, MOVE]).sum() / n
                                  - VIDEO_SCORE_EXPECTED) if n else 0.0)
        cache.append((scores, scored))
    total = sum(len(r) for _, r in heldout)
    hours = total / FRAMES_PER_HOUR
    alphas = DEFAULT_ALPHAS if alpha is None else np.asarray(alpha, dtype=np.float64)
    judge_population = (population and model.training.get("between_video_dof", 1) >= 1
                        and len(heldout) >= MIN_POPULATION_HELDOUT)
    raise_thr = np.full(N_GROUPS, math.inf)
    clear_thr = np.full(N_GROUPS, math.inf)
    excursions: dict[str, int] = {}
    not_judged: list[str] = []
    unreachable: list[str] = []
    judged = [g for g in range(N_GROUPS)
              if g != SENSOR and (judge_population or g in SINGLE_VIDEO_GROUPS)]
    # every judged group may raise: the promise is shared among them (any of them raising
    # is a false alarm), so each gets its part of the rate
    per_group_rate = fa_per_hour / max(len(judged), 1)
    for g in range(N_GROUPS):
        name = GROUPS[g]
        if g == SENSOR:
            raise_thr[g] = SENSOR_RAISE
            clear_thr[g] = 0.5 * SENSOR_RAISE
            continue
        if g not in judged:
            not_judged.append(name)
            continue
        series = [v for v in per_group[g] if len(v)]
        if not series:  # never judged in the held-out footage
            not_judged.append(name)
            continue
        thr, k = tail_threshold(series, hours, per_group_rate)
        excursions[name] = k
        a = float(alphas[g])
        if a < 1.0:
            # no lower than one frame at the clip gives: one frame alone cannot raise
            floor = a * ATTAINABLE[g]
        else:  # an EWMA of the residual already: a frame moves it by CHANGE_ALPHA at most
            floor = 0.0
        nominal = nominal_threshold(g, per_group_rate)
        if not math.isfinite(thr):
            if nominal <= 0.0:  # nothing to go by: the footage cannot calibrate it
                not_judged.append(name)
                continue
            thr = 0.0  # a level score with few excursions: its nominal level decides
        thr = max(thr, floor, nominal)
        if g not in SINGLE_VIDEO_GROUPS:
            # a group whose level differs between videos: the excursions of a few held-out
            # videos say how one of them varies, not how far the next video sits; bound the
            # next video's peak from the held-out videos' peaks (normal prediction bound,
            # Student-t for how few they are) at the per-video share of the promise
            peaks = [float(v.max()) for v in series]
            thr = max(thr, prediction_upper(peaks, per_group_rate * hours / len(series)))
        if thr >= ATTAINABLE[g]:
            unreachable.append(name)
            continue
        raise_thr[g] = thr
        level = float(np.median(np.concatenate(series)))
        clear_thr[g] = level + 0.5 * (thr - level)
    vs = np.array(video_scores)
    video_thr = max(float(vs.max() + max(3.0 * vs.std(), 1.0)), VIDEO_THR_FLOOR)
    model.raise_thr[:] = raise_thr
    model.clear_thr[:] = clear_thr
    model.video_thr[:] = video_thr
    # how many alarms would the held-out footage itself raise?
    alarms = 0
    for scores, scored in cache:
        det = Detector(raise_thr, clear_thr, video_thr, alpha, clear_frames)
        alarms += count_raises(scores, scored, det.state)
    info = {
        "method": "excursion peaks over the 99th percentile, exponential tail, "
                  f"{CONFIDENCE:.0%} bounds",
        "alpha": [float(a) for a in (DEFAULT_ALPHAS if alpha is None else alpha)],
        "clear_frames": clear_frames,
        "fa_per_hour_target": fa_per_hour,
        "fa_per_hour_per_group": per_group_rate,
        "raise": {g: float(raise_thr[i]) for i, g in enumerate(GROUPS)},
        "clear": {g: float(clear_thr[i]) for i, g in enumerate(GROUPS)},
        "excursions": excursions,
        "not_judged": not_judged,
        "unreachable": unreachable,
        "video": video_thr,
        "heldout_videos": len(heldout),
        "heldout_frames": int(total),
        "heldout_hours": hours,
        "heldout_alarms": alarms,
        "heldout_video_scores": {"max": float(vs.max()), "mean": float(vs.mean())},
    }
    model.calibration = info
    return info
