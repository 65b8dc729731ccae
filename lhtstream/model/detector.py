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
training: for each group, the smoothed scores of all held-out frames are
pooled; above their 99th percentile u the tail is modelled as exponential
(peaks over threshold: mean excess beta), and the raise threshold is the
level exceeded with probability ``fa_per_hour * run / 3.6e6`` per frame
(``run`` = mean frames per excursion above u, so excursions, i.e. alarms,
happen `fa_per_hour` times per hour at 1 kHz). It is never below 1.1 x the
largest held-out value nor below a per-group floor. The clear threshold is
half-way between the held-out median and the raise threshold.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lhtstream.kernels.detection import (
    ALARM_KINDS,
    D_ACTIVE,
    D_ALPHA,
    D_CHANGED,
    D_CLEAR,
    D_CLEAR_FRAMES,
    D_NRAISED,
    D_PEAK,
    D_QUIET,
    D_RAISE,
    D_SMOOTH,
    D_VN,
    D_VSUM,
    D_WHICH,
    DET_SIZE,
    K_SENSOR,
    KIND_OF_GROUP,
    N_KINDS,
    VIDEO_SCORE_EXPECTED,
    count_raises,
    detect_step,
    smooth_rows,
)
from lhtstream.kernels.scoring import COMB, GROUPS, MOVE, N_GROUPS, SENSOR, TRAJ
from lhtstream.model.normality import NormalityModel

__all__ = ["ALARM_KINDS", "K_SENSOR", "KIND_OF_GROUP", "N_KINDS", "Alarm", "Verdict",
           "Detector", "calibrate", "smoothed_scores", "tail_threshold"]

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
# scores are chi2-distributed and heavy-tailed), the rest over half a cycle.
DEFAULT_ALPHAS = np.full(N_GROUPS, DEFAULT_ALPHA)
DEFAULT_ALPHAS[TRAJ] = DEFAULT_ALPHAS[MOVE] = DEFAULT_ALPHAS[COMB] = 0.1
DEFAULT_CLEAR_FRAMES = 100
FRAMES_PER_HOUR = 3_600_000.0
TAIL_QUANTILE = 0.99
# Lowest raise thresholds (smoothed units), for tiny held-out sets.
THRESHOLD_FLOOR = np.array([6.0, 6.0, 4.0, 4.0, 4.0, 4.0, 6.0, 10.0, 5.0, 0.45])
# Neutral (normal-expectation) level of each group: where smoothing starts.
NEUTRAL = np.zeros(N_GROUPS)
NEUTRAL[TRAJ] = NEUTRAL[MOVE] = NEUTRAL[COMB] = 2.0
# Lowest video threshold (units of the mean statistic, excess chi2 per frame): a held-out
# set of a few videos (a KDE-AMD protocol fold: 3, in-sample) underestimates how much
# the statistic varies between videos of different geometry (a full model: ~18).
VIDEO_THR_FLOOR = 3.0
# Groups whose peak enters the verdict score. Not trajectory/move: their sum is the mean
# statistic already, and their peaks follow a video's pattern size (which varies between
# normal videos); the cycle comb measures the trajectory free of geometry.
VERDICT_PEAK = np.ones(N_GROUPS, dtype=bool)
VERDICT_PEAK[TRAJ] = VERDICT_PEAK[MOVE] = False


@dataclass
class Alarm:
    """An alarm raised or cleared at one frame; `score`/`threshold` in smoothed units."""

    stream: str
    video: str
    type: int
    frame: int
    t_frame_ns: int
    kind: str
    state: str  # "raise" or "clear"
    score: float
    threshold: float
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    """End-of-video judgement: `score` (largest evidence / its threshold, 1.0 = at a
    threshold; see the module doc), `anomalous`, alarms raised and their kinds."""

    stream: str
    video: str
    type: int
    frames: int
    score: float
    anomalous: bool
    alarms: int
    kinds: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ detector


class Detector:
    """Hysteresis alarms over smoothed group scores for one stream (see module doc)."""

    def __init__(self, raise_thr: np.ndarray, clear_thr: np.ndarray, video_thr: float,
                 alpha: np.ndarray | None = None,
                 clear_frames: int = DEFAULT_CLEAR_FRAMES,
                 state: np.ndarray | None = None) -> None:
        """`state`: a float64 array of `DET_SIZE` to keep the detector in (a slice of a
        stream's state, so the fused per-frame kernel steps it); a private one if None."""
        self.state = np.zeros(DET_SIZE) if state is None else state
        if self.state.shape != (DET_SIZE,) or self.state.dtype != np.float64:
            raise ValueError(f"detector state must be float64 ({DET_SIZE},)")
        st = self.state
        self.smooth = st[D_SMOOTH:D_SMOOTH + N_GROUPS]
        self.peak = st[D_PEAK:D_PEAK + N_GROUPS]
        self.raise_thr = st[D_RAISE:D_RAISE + N_GROUPS]
        self.clear_thr = st[D_CLEAR:D_CLEAR + N_GROUPS]
        self.alpha = st[D_ALPHA:D_ALPHA + N_GROUPS]
        self.active = st[D_ACTIVE:D_ACTIVE + N_KINDS]
        self.quiet = st[D_QUIET:D_QUIET + N_KINDS]
        self.changed = st[D_CHANGED:D_CHANGED + N_KINDS]
        self.which = st[D_WHICH:D_WHICH + N_KINDS]
        self.raise_thr[:] = raise_thr
        self.clear_thr[:] = clear_thr
        self.alpha[:] = DEFAULT_ALPHAS if alpha is None else alpha
        self.video_thr = float(video_thr)
        self.clear_frames = int(clear_frames)
        st[D_CLEAR_FRAMES] = self.clear_frames
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
        self.peak[:] = 0.0
        self.state[D_ACTIVE:D_CLEAR_FRAMES] = 0.0  # kinds and verdict accumulators
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
        n = self.state[D_VN]
        return float(self.state[D_VSUM] / n) if n > 0 else 0.0

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
        return int(self.state[D_NRAISED])

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


def tail_threshold(values: np.ndarray, per_frame_p: float, floor: float) -> float:
    """Level exceeded with probability `per_frame_p`, exponential tail above the 99th pct."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 100:
        return max(floor, 1.1 * float(v.max()) if len(v) else floor)
    u = float(np.quantile(v, TAIL_QUANTILE))
    exc = v[v > u] - u
    beta = float(exc.mean()) if len(exc) else 0.0
    p_u = max(len(exc) / len(v), 1e-12)
    level = u + beta * math.log(max(p_u / per_frame_p, 1.0))
    vmax = float(v.max())
    return max(floor, level, vmax + 0.1 * abs(vmax))


def calibrate(model: NormalityModel, heldout: list[tuple[int, np.ndarray]],
              fa_per_hour: float = 1.0, alpha: np.ndarray | None = None,
              clear_frames: int = DEFAULT_CLEAR_FRAMES) -> dict[str, Any]:
    """Set the model's raise/clear/video thresholds from held-out normal videos.

    Thresholds are pooled over types (scores are already normalised per cell).
    Returns (and stores in `model.calibration`) what was set and how many
    alarms the held-out footage itself raises with them.
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
    raise_thr = np.zeros(N_GROUPS)
    clear_thr = np.zeros(N_GROUPS)
    for g in range(N_GROUPS):
        v = np.concatenate(per_group[g]) if per_group[g] else np.zeros(0)
        if len(v) == 0:
            raise_thr[g] = THRESHOLD_FLOOR[g]
            clear_thr[g] = 0.5 * THRESHOLD_FLOOR[g]
            continue
        u = np.quantile(v, TAIL_QUANTILE)
        above = v > u
        excursions = max(int(np.count_nonzero(above[1:] & ~above[:-1])) + int(above[0]), 1)
        run = max(above.sum() / excursions, 1.0)
        p = fa_per_hour * run / FRAMES_PER_HOUR
        raise_thr[g] = tail_threshold(v, p, float(THRESHOLD_FLOOR[g]))
        level = float(np.median(v))
        clear_thr[g] = level + 0.5 * (raise_thr[g] - level)
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
        "alpha": [float(a) for a in (DEFAULT_ALPHAS if alpha is None else alpha)],
        "clear_frames": clear_frames,
        "fa_per_hour_target": fa_per_hour,
        "raise": {g: float(raise_thr[i]) for i, g in enumerate(GROUPS)},
        "clear": {g: float(clear_thr[i]) for i, g in enumerate(GROUPS)},
        "video": video_thr,
        "heldout_videos": len(heldout),
        "heldout_frames": int(total),
        "heldout_hours": total / FRAMES_PER_HOUR,
        "heldout_alarms": alarms,
        "heldout_video_scores": {"max": float(vs.max()), "mean": float(vs.mean())},
    }
    model.calibration = info
    return info
