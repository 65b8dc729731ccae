"""Detector kernels: per-group scores -> smoothed scores -> alarm kinds with hysteresis.

The detector's whole state is one float64 array (`DET_SIZE`; counts and flags
are small whole numbers, exact in float64), so the fused per-frame step
(`lhtstream.kernels.step`) carries it as a slice of the stream's state. Its layout is
`DET` (G = `N_GROUPS`, K = `N_KINDS`); `lhtstream.model.detector.Detector` reads
and writes it by field name.
"""

from __future__ import annotations

import numpy as np

from lhtstream.kernels.layout import Layout, kernel
from lhtstream.kernels.scoring import (
    COMB,
    FREQ,
    IMAGE,
    IMAGE_CHANGE,
    INT_FALL,
    INT_HIGH,
    INT_LOW,
    INT_RISE,
    MOVE,
    N_GROUPS,
    POS_CHANGE,
    SENSOR,
    SIZE,
    SIZE_CHANGE,
    SLIP,
    STALL,
    TRAJ,
)

ALARM_KINDS: tuple[str, ...] = (
    "trajectory", "intensity_low", "intensity_high", "stall", "frequency", "spot_size",
    "image", "sensor",
)
K_SENSOR = ALARM_KINDS.index("sensor")  # the last kind (the kernel relies on it)
N_KINDS = len(ALARM_KINDS)

# group -> alarm kind
KIND_OF_GROUP = np.zeros(N_GROUPS, dtype=np.int64)
for _g, _k in ((TRAJ, "trajectory"), (MOVE, "trajectory"), (COMB, "trajectory"),
               (POS_CHANGE, "trajectory"), (INT_LOW, "intensity_low"),
               (INT_FALL, "intensity_low"), (INT_HIGH, "intensity_high"),
               (INT_RISE, "intensity_high"), (SIZE, "spot_size"), (SIZE_CHANGE, "spot_size"),
               (STALL, "stall"), (FREQ, "frequency"), (SLIP, "frequency"), (IMAGE, "image"),
               (IMAGE_CHANGE, "image"), (SENSOR, "sensor")):
    KIND_OF_GROUP[_g] = ALARM_KINDS.index(_k)
KIND_OF_GROUP.setflags(write=False)  # compiled into the kernels as a constant

VIDEO_SCORE_EXPECTED = 4.0  # chi2(2) + chi2(2) expectation subtracted from the verdict score

_G = N_GROUPS
_K = N_KINDS
DET = Layout("detector", [
    ("smooth", _G),  # smoothed group scores
    ("peak", _G),  # highest smooth / raise threshold this video
    ("raise", _G), ("clear", _G),  # thresholds
    ("alpha", _G),  # EWMA weights
    ("active", _K),  # per kind: 0/1
    ("quiet", _K),  # frames under the clear levels
    ("changed", _K),  # +1 raised, -1 cleared, 0 this frame
    ("which", _K),  # the group that decided
    ("vsum", 1),  # sum over judged frames of trajectory + move - 4
    ("vn", 1),  # judged frames
    ("frames", 1),  # frames stepped
    ("nraised", 1),  # process alarms raised
    ("clear_frames", 1),  # frames every process group must stay under to clear
    ("best", _K),  # scratch per kind: highest smooth - raise threshold
    ("over", _K),  # scratch per kind: 1 when a group is over its raise threshold
    ("under", _K),  # scratch per kind: 1 when every group is under its clear one
])
#: the fields a new video starts from zero (`lhtstream.model.detector.Detector.reset`)
VIDEO_FIELDS = ("peak", "active", "quiet", "changed", "which", "vsum", "vn", "frames",
                "nraised")
D_SMOOTH = DET.offset("smooth")
D_PEAK = DET.offset("peak")
D_RAISE = DET.offset("raise")
D_CLEAR = DET.offset("clear")
D_ALPHA = DET.offset("alpha")
D_ACTIVE = DET.offset("active")
D_QUIET = DET.offset("quiet")
D_CHANGED = DET.offset("changed")
D_WHICH = DET.offset("which")
D_VSUM = DET.offset("vsum")
D_VN = DET.offset("vn")
D_FRAMES = DET.offset("frames")
D_NRAISED = DET.offset("nraised")
D_CLEAR_FRAMES = DET.offset("clear_frames")
D_BEST = DET.offset("best")
D_OVER = DET.offset("over")
D_UNDER = DET.offset("under")
DET_SIZE = DET.size


@kernel
def detect_step(scores, scored, det):
    """Advance smoothing and hysteresis by one frame; returns the number of kind changes.

    `scores` (N_GROUPS) of one frame, `scored` 1 when its process groups were judged.
    After a non-zero return, det[D_CHANGED + k] is +1/-1 for raised/cleared kinds.
    """
    kind_of = KIND_OF_GROUP
    smooth = det[D_SMOOTH:D_SMOOTH + _G]
    peak = det[D_PEAK:D_PEAK + _G]
    raise_thr = det[D_RAISE:D_RAISE + _G]
    clear_thr = det[D_CLEAR:D_CLEAR + _G]
    alpha = det[D_ALPHA:D_ALPHA + _G]
    active = det[D_ACTIVE:D_ACTIVE + _K]
    quiet = det[D_QUIET:D_QUIET + _K]
    changed = det[D_CHANGED:D_CHANGED + _K]
    which = det[D_WHICH:D_WHICH + _K]
    G = _G
    K = _K
    det[D_FRAMES] += 1.0
    for g in range(G):
        if scored == 1 or kind_of[g] == K - 1:
            smooth[g] += alpha[g] * (scores[g] - smooth[g])
            # the verdict's peak evidence: highest smoothed score relative to its raise
            # threshold (process groups only where they advanced, the sensor always)
            r = smooth[g] / raise_thr[g]
            if r > peak[g]:
                peak[g] = r
    if scored == 1:
        det[D_VSUM] += scores[0] + scores[1] - VIDEO_SCORE_EXPECTED
        det[D_VN] += 1.0
    sensor_on = active[K - 1] == 1.0
    best = det[D_BEST:D_BEST + _K]
    over = det[D_OVER:D_OVER + _K]
    under = det[D_UNDER:D_UNDER + _K]
    for k in range(K):
        changed[k] = 0.0
        best[k] = -1.0e300
        over[k] = 0.0
        under[k] = 1.0
    # One fault episode moves several process groups at different times (a stall
    # drops the intensity in bursts and shifts the rate at its start and end), so a
    # process kind's clear hold counts only frames where the whole process is back
    # below its clear levels: one raise per kind per episode, all clear together.
    proc_under = True
    for g in range(G):  # groups in order: `which` is the first group at the maximum
        k = kind_of[g]
        r = smooth[g] - raise_thr[g]
        if r > best[k]:
            best[k] = r
            which[k] = g
        if smooth[g] > raise_thr[g]:
            over[k] = 1.0
        if smooth[g] > clear_thr[g]:
            under[k] = 0.0
            if k != K - 1:
                proc_under = False
    clear_frames = det[D_CLEAR_FRAMES]
    n = 0
    for k in range(K):
        if active[k] == 0.0:
            if over[k] != 0.0 and (k == K - 1 or not sensor_on):
                active[k] = 1.0
                quiet[k] = 0.0
                changed[k] = 1.0
                n += 1
                if k != K - 1:
                    det[D_NRAISED] += 1.0
        else:
            if under[k] != 0.0 and (k == K - 1 or proc_under):
                quiet[k] += 1.0
                if quiet[k] >= clear_frames:
                    active[k] = 0.0
                    changed[k] = -1.0
                    n += 1
            else:
                quiet[k] = 0.0
    return n


@kernel
def any_active(det) -> bool:
    """True when an alarm kind is active."""
    for k in range(_K):
        if det[D_ACTIVE + k] != 0.0:
            return True
    return False


@kernel
def count_raises(scores, scored, det):
    """Step the detector over a whole video's scores (n, G); returns the alarms raised."""
    raises = 0
    for t in range(scores.shape[0]):
        if detect_step(scores[t], scored[t], det):
            for k in range(_K):
                if det[D_CHANGED + k] == 1.0:
                    raises += 1
    return raises


@kernel
def smooth_rows(scores, scored, alpha, smooth, out):
    """The detector's smoothing alone over a video's scores (n, G) into `out` (n, G)."""
    G = smooth.shape[0]
    for t in range(scores.shape[0]):
        for g in range(G):
            if scored[t] == 1 or g == G - 1:
                smooth[g] += alpha[g] * (scores[t, g] - smooth[g])
            out[t, g] = smooth[g]
