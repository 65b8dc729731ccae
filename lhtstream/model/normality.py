"""Normality model: what normal frames look like, as per-cell Gaussians.

A *cell* is (workpiece type, obstacle state 0/1/2, cycle-phase bin). For each
cell the model holds, learned from normal videos only:

- a 4-D Gaussian of (dx, dy, vx, vy): the spot's position relative to the
  video's running centre (px) and its move since the previous frame
  (px/frame). The position part is KDE-AMD's "where is the spot"; the move
  given the position is KDE-AMD's "where does a move from here go", but
  precomputed, so a frame costs a lookup and a few flops, not a kernel sum;
- 1-D Gaussians of log intensity, spread (log intensity - log peak: the
  spot's effective size in pixels, independent of laser power) and log speed;
- per (type, obstacle state): a Gaussian of the phase rate (1.0 at 100 Hz).

Means are linearly interpolated between phase-bin centres (the ten samples of
a cycle precess, so phase is continuous); covariances come from the nearest
bin. The running centre is the EWMA of (position - mean relative position at
this phase), which is unbiased from the first frame on, unlike a running mean
over partial cycles; it is updated on obstacle-free frames only because the
obstacle patterns are not centred on the eight.

Per-frame group scores (`GROUPS`, see `score_one`):

| group | score | normal level |
| --- | --- | --- |
| trajectory | squared Mahalanobis distance of (dx, dy) | chi2(2): mean 2 |
| move | squared Mahalanobis distance of (vx, vy) given (dx, dy) | chi2(2): mean 2 |
| intensity_low / intensity_high | -z / +z of log intensity | N(0, 1) |
| spot_size | +z of spread | N(0, 1) |
| stall | -z of log speed | N(0, 1) |
| frequency | abs z of rate | half-normal |
| cycle_residual | d2 of p_t - p_{t-10} minus the cycle slip (the comb) | chi2(2): mean 2 |
| cycle_slip | abs z of the consistent along-track slip per cycle | half-normal |
| sensor | 1 for an all-zero or repeated frame | 0 |

Saved as one `.npz`: arrays plus a JSON header under the key `header`
(format version, training-data description, feature settings, a SHA-256 of
the arrays), loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from lhtstream.base.errors import LhtstreamError
from lhtstream.kernels import features as F

FORMAT = "lhtstream-model"
FORMAT_VERSION = 2  # 2: cycle-comb groups (cycle_residual, cycle_slip) and their arrays

# Score groups (columns of the score vector). SENSOR stays last (the detector relies on it).
TRAJ, MOVE, INT_LOW, INT_HIGH, SIZE, STALL, FREQ, COMB, SLIP, SENSOR = range(10)
GROUPS: tuple[str, ...] = (
    "trajectory", "move", "intensity_low", "intensity_high",
    "spot_size", "stall", "frequency", "cycle_residual", "cycle_slip", "sensor",
)
N_GROUPS = len(GROUPS)

# Per-cell mean vector layout: dx, dy, vx, vy, log intensity, spread, log speed.
N_MEAN = 7
N_SCALAR = 3  # log intensity, spread, log speed
N_OBSTACLE = 3

DEFAULT_PHASE_BINS = 50
CYCLE_FRAMES = 10.0          # phase range [0, 10) frames
WARMUP_FRAMES = 100          # frames at a video's start that are not scored (phase lock, centre)
CENTRE_TAU = 500.0           # frames; time constant of the running centre
SPEED_OFFSET = 0.5           # px/frame added before log(speed): bounded score near a stop
D2_CLIP = 50.0               # per-frame cap so one glitch cannot dominate a smoothed score
Z_CLIP = 10.0
SLIP_CLIP = 20.0             # a 3 % frequency step is ~40 sd of the normal cycle slip
COMB_CLIP = 25.0             # lower cap for the comb: one bad frame alone cannot raise an alarm
PRIOR_WEIGHT = 5.0           # frames' worth of pooled covariance mixed into each cell
MIN_CELL_COUNT = 3.0         # a cell with fewer training frames is not judged
MIN_STATE_COUNT = 50.0       # an obstacle state with fewer training frames is not judged
COV_FLOOR = 1e-4             # px^2; keeps every covariance positive definite
DEFAULT_LEARN_RATE = 1e-3    # per update of a cell


class ModelError(LhtstreamError):
    """A model file that cannot be used: wrong format, version, settings or tampered."""


# ------------------------------------------------------------------ feature columns


def feature_columns() -> dict[str, int]:
    """Column indices of the feature row (from `lhtstream.kernels.features`)."""

    return {name: int(getattr(F, name)) for name in _COL_ORDER}


def feature_settings() -> dict[str, Any]:
    """The feature-extraction settings a model depends on (checked on load)."""

    settings: dict[str, Any] = {"n_features": int(F.N_FEATURES), "columns": feature_columns()}
    for name in ("THRESHOLD", "DEFAULT_THRESHOLD"):
        if hasattr(F, name):
            settings["threshold"] = float(getattr(F, name))
            break
    return settings


# Order of the `cols` array passed to the kernels (also the columns a model records).
_COL_ORDER = ("X", "Y", "INTENSITY", "PEAK", "AREA", "EMPTY", "REPEAT",
              "VX", "VY", "PHASE", "RATE", "OBSTACLE")
(C_X, C_Y, C_INT, C_PEAK, C_AREA, C_EMPTY, C_REPEAT,
 C_VX, C_VY, C_PHASE, C_RATE, C_OBS) = range(len(_COL_ORDER))


def _cols_array(columns: dict[str, int]) -> np.ndarray:
    return np.array([columns[n] for n in _COL_ORDER], dtype=np.int64)


# ------------------------------------------------------------------ kernels

# Scoring state per stream/video: running centre x, y (px) and its sample count.
# S_PREV: 1 when the previous frame was empty/repeated (this frame's velocity is then
# a jump across the gap, not a move, so the frame is not judged).
# S_LASTOBS / S_SINCE: obstacle state of the previous frame and frames since it changed
# (the scanner finishes the pattern it was on when a window opens or closes, so frames
# just after a key frame belong to neither pattern and are not judged).
# Then the cycle comb: a ring of the last COMB_LAG frames' (x, y, obstacle, ok) and of
# their slip terms (d.v, v.v), indexed by frame count modulo COMB_LAG.
S_CX, S_CY, S_N, S_FRAMES, S_PREV, S_LASTOBS, S_SINCE = range(7)
COMB_LAG = 10                # frames per scan cycle (100 Hz scanner, 1 kHz camera)
S_RING = 7                   # COMB_LAG x (x, y, obstacle, ok)
S_SLIPRING = S_RING + 4 * COMB_LAG   # COMB_LAG x (d.v, v.v, d.d)
STATE_SIZE = S_SLIPRING + 3 * COMB_LAG
TRANSITION_FRAMES = 20
STALL_SPEED_FRACTION = 0.5   # stall is judged only below this share of the cell's normal speed
SLIP_FRAMES = 5              # frames whose d the slip is fitted on (half a cycle: fast, and
MIN_SLIP_FRAMES = 3          # still several directions); valid ones needed for an estimate
# A slip is a frequency change only when it explains most of the cycle's moves d (a
# consistent along-track shift); a changed pattern shape moves points every which way.
SLIP_CONSISTENCY = 0.5       # share of sum(d.d) explained by the slip
SLIP_OVER_COMB = 3.0         # |z| of a consistent slip above which the comb is left to it


@njit(cache=True)
def _bin_weights(phase: float, nbins: int) -> tuple[int, int, float, int]:
    """Interpolation bins (i0, i1), weight of i1, and the nearest bin."""
    u = phase * nbins / 10.0 - 0.5
    fl = math.floor(u)
    w = u - fl
    i0 = int(fl) % nbins
    if i0 < 0:
        i0 += nbins
    i1 = i0 + 1
    if i1 >= nbins:
        i1 = 0
    near = i1 if w >= 0.5 else i0
    return i0, i1, w, near


@njit(cache=True)
def _derived(row, cols, out7):
    """Fill the 7 modelled quantities except the centring of dx, dy."""
    out7[0] = row[cols[C_X]]
    out7[1] = row[cols[C_Y]]
    vx = row[cols[C_VX]]
    vy = row[cols[C_VY]]
    out7[2] = vx
    out7[3] = vy
    inten = row[cols[C_INT]]
    peak = row[cols[C_PEAK]]
    li = math.log(max(inten, 0.0) + 1.0)
    out7[4] = li
    out7[5] = li - math.log(max(peak, 0.0) + 1.0)
    out7[6] = math.log(math.sqrt(vx * vx + vy * vy) + SPEED_OFFSET)


@njit(cache=True)
def _comb_step(row, cols, state, unusable, velocity_ok, obs, in_transition, out3):
    """Advance the cycle comb by one frame (call once per frame, after S_FRAMES += 1).

    out3 = (dx, dy, slip, consistency). slip: the least-squares along-track slip of the last
    cycle's d = p_t - p_{t-COMB_LAG} on the frame moves v, sum(d.v) / sum(v.v)
    (frames of phase per cycle); consistency: the share of the cycle's sum(d.d) the
    slip explains (0..1). (dx, dy): this frame's d minus slip x its move (px).
    Returns bit 1 when d is valid (both frames usable, same obstacle state, not just
    after a key frame) and bit 2 when the slip is.
    """
    f = int(state[S_FRAMES]) - 1
    k = f % COMB_LAG
    b = S_RING + 4 * k
    sb = S_SLIPRING + 3 * k
    x = row[cols[C_X]]
    y = row[cols[C_Y]]
    ok_now = (not unusable) and math.isfinite(x) and math.isfinite(y)
    old_ok = f >= COMB_LAG and state[b + 3] > 0.5 and int(state[b + 2]) == obs
    out3[0] = 0.0
    out3[1] = 0.0
    out3[2] = 0.0
    out3[3] = 0.0
    state[sb] = 0.0
    state[sb + 1] = 0.0
    state[sb + 2] = 0.0
    valid = 0
    if ok_now and old_ok and not in_transition:
        dx = x - state[b]
        dy = y - state[b + 1]
        out3[0] = dx
        out3[1] = dy
        valid = 1
        if velocity_ok:
            vx = row[cols[C_VX]]
            vy = row[cols[C_VY]]
            state[sb] = dx * vx + dy * vy
            state[sb + 1] = vx * vx + vy * vy
            state[sb + 2] = dx * dx + dy * dy
    state[b] = x
    state[b + 1] = y
    state[b + 2] = obs
    state[b + 3] = 1.0 if ok_now else 0.0
    sdv = 0.0
    svv = 0.0
    sdd = 0.0
    n = 0
    for back in range(SLIP_FRAMES):
        j = (k - back) % COMB_LAG
        vv = state[S_SLIPRING + 3 * j + 1]
        if vv > 0.0:
            sdv += state[S_SLIPRING + 3 * j]
            svv += vv
            sdd += state[S_SLIPRING + 3 * j + 2]
            n += 1
    if n >= MIN_SLIP_FRAMES and svv > 0.0:
        sl = sdv / svv
        out3[2] = sl
        out3[3] = sdv * sdv / (svv * sdd) if sdd > 0.0 else 0.0
        valid |= 2
        if (valid & 1) != 0 and velocity_ok:
            # the cycle's common along-track slip is precession (scan-frequency offset),
            # not a trajectory change: take it out of the residual
            out3[0] -= sl * row[cols[C_VX]]
            out3[1] -= sl * row[cols[C_VY]]
    return valid


@njit(cache=True)
def _centre_step(state, ex, ey):
    """Feed one obstacle-free frame's offset (ex, ey) (px) to the running centre.

    Returns the centre before this frame moved it (the first frame starts it).
    """
    if state[S_N] == 0.0:
        state[S_CX] = ex
        state[S_CY] = ey
    n = state[S_N] + 1.0
    state[S_N] = n
    a = max(1.0 / n, 1.0 / CENTRE_TAU)
    cx = state[S_CX]
    cy = state[S_CY]
    state[S_CX] = cx + a * (ex - cx)
    state[S_CY] = cy + a * (ey - cy)
    return cx, cy


@njit(cache=True)
def _frame_flags(row, cols, state):
    """Per-frame bookkeeping shared by scoring and fitting; advances the state.

    Returns (blank, unusable, after_gap, obs, in_transition): blank = camera fault
    (all-zero or byte-repeated frame); unusable = no fresh spot position (blank, or
    nothing above threshold: a stalled spot heats nothing new).
    """
    empty = row[cols[C_EMPTY]] > 0.5
    repeat = row[cols[C_REPEAT]] > 0.5
    blank = repeat or (empty and not row[cols[C_PEAK]] > 0.0)
    unusable = empty or repeat
    state[S_FRAMES] += 1.0
    after_gap = state[S_PREV] > 0.5
    state[S_PREV] = 1.0 if unusable else 0.0
    ov = row[cols[C_OBS]]
    obs = int(ov) if math.isfinite(ov) else -1
    if state[S_FRAMES] == 1.0 or obs != int(state[S_LASTOBS]):
        state[S_SINCE] = 0.0
    else:
        state[S_SINCE] += 1.0
    state[S_LASTOBS] = obs
    in_transition = state[S_FRAMES] > 1.0 and state[S_SINCE] < TRANSITION_FRAMES
    return blank, unusable, after_gap, obs, in_transition


@njit(cache=True)
def _comb_rows_kernel(rows, cols, state, out, valid):
    """Batch form of the comb (for fitting): out (n, 4) = dx, dy, slip, consistency."""
    for t in range(rows.shape[0]):
        blank, unusable, after_gap, obs, in_tr = _frame_flags(rows[t], cols, state)
        valid[t] = _comb_step(rows[t], cols, state, unusable,
                              not (unusable or after_gap), obs, in_tr, out[t])


@njit(cache=True)
def _score_kernel(row, cols, slot, mean, prec4, prec2, svar, rate, cprec, slip, valid, known,
                  state, out, work):
    """Score one feature row into `out` (N_GROUPS); update the running centre and comb.

    Returns 1 when the process groups were scored, 0 when the frame cannot be
    judged (blank/repeated, warm-up, unknown cell): then they hold neutral values.
    A frame with nothing above threshold that is not all zero (a stalled spot
    heats nothing new) is judged as a stall, not as a camera fault.
    """
    nb = mean.shape[2]
    blank, unusable, after_gap, obs, in_transition = _frame_flags(row, cols, state)
    out[SENSOR] = 1.0 if blank else 0.0
    out[TRAJ] = 2.0
    out[MOVE] = 2.0
    out[INT_LOW] = 0.0
    out[INT_HIGH] = 0.0
    out[SIZE] = 0.0
    out[STALL] = 0.0
    out[FREQ] = 0.0
    out[COMB] = 2.0
    out[SLIP] = 0.0
    comb = work[20:24]
    cv = _comb_step(row, cols, state, unusable, not (unusable or after_gap), obs,
                    in_transition, comb)
    phase = row[cols[C_PHASE]]
    if blank or slot < 0 or not math.isfinite(phase) or obs < 0 or obs > 2:
        return 0
    if known[slot, obs] == 0:
        return 0
    if unusable:
        # faint, not blank: the spot stopped moving (no new pixels heated)
        if state[S_FRAMES] <= WARMUP_FRAMES:
            return 0
        out[STALL] = Z_CLIP
        return 1
    i0, i1, w, near = _bin_weights(phase, nb)
    x = work
    _derived(row, cols, x)
    # interpolated means into work[7:14]
    for k in range(N_MEAN):
        x[7 + k] = (1.0 - w) * mean[slot, obs, i0, k] + w * mean[slot, obs, i1, k]
    # running centre: only obstacle-free frames feed it
    if obs == 0:
        # score against the centre before this frame moved it (no self-influence)
        cx, cy = _centre_step(state, x[0] - x[7], x[1] - x[8])
    else:
        cx = state[S_CX]
        cy = state[S_CY]
    if (state[S_N] == 0.0 or state[S_FRAMES] <= WARMUP_FRAMES or after_gap or in_transition
            or valid[slot, obs, near] == 0):
        return 0
    r0 = x[0] - cx - x[7]
    r1 = x[1] - cy - x[8]
    r2 = x[2] - x[9]
    r3 = x[3] - x[10]
    p2 = prec2[slot, obs, near]
    d2p = p2[0, 0] * r0 * r0 + 2.0 * p2[0, 1] * r0 * r1 + p2[1, 1] * r1 * r1
    p4 = prec4[slot, obs, near]
    rr = (r0, r1, r2, r3)
    d4 = 0.0
    for i in range(4):
        for j in range(4):
            d4 += rr[i] * p4[i, j] * rr[j]
    out[TRAJ] = min(d2p, D2_CLIP)
    out[MOVE] = min(max(d4 - d2p, 0.0), D2_CLIP)
    sv = svar[slot, obs, near]
    zi = (x[4] - x[11]) / math.sqrt(sv[0])
    zs = (x[5] - x[12]) / math.sqrt(sv[1])
    zv = (x[6] - x[13]) / math.sqrt(sv[2])
    zi = min(max(zi, -Z_CLIP), Z_CLIP)
    out[INT_LOW] = -zi
    out[INT_HIGH] = zi
    out[SIZE] = min(max(zs, -Z_CLIP), Z_CLIP)
    # stall only when the spot is really slow: a smaller or slower pattern is not a stall
    speed = math.exp(x[6]) - SPEED_OFFSET
    slow = speed < STALL_SPEED_FRACTION * (math.exp(x[13]) - SPEED_OFFSET)
    if slow:
        out[STALL] = min(max(-zv, 0.0), Z_CLIP)
    zr = (row[cols[C_RATE]] - rate[slot, obs, 0]) / math.sqrt(rate[slot, obs, 1])
    if not math.isfinite(zr):
        zr = 0.0
    out[FREQ] = min(abs(zr), Z_CLIP)
    zl = 0.0
    if (cv & 2) != 0 and comb[3] >= SLIP_CONSISTENCY:
        zl = abs(comb[2] - slip[slot, obs, 0]) / math.sqrt(slip[slot, obs, 1])
        out[SLIP] = min(zl, SLIP_CLIP)
    if (cv & 1) != 0 and not slow and zl < SLIP_OVER_COMB:
        cp = cprec[slot, obs, near]
        dx = comb[0]
        dy = comb[1]
        d2c = cp[0, 0] * dx * dx + 2.0 * cp[0, 1] * dx * dy + cp[1, 1] * dy * dy
        out[COMB] = min(d2c, COMB_CLIP)
    return 1


@njit(cache=True)
def _invert(a, out, n, work):
    """Gauss-Jordan inverse of the n x n matrix `a` into `out` (no allocation)."""
    for i in range(n):
        for j in range(n):
            work[i, j] = a[i, j]
            work[i, n + j] = 1.0 if i == j else 0.0
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(work[r, c]) > abs(work[p, c]):
                p = r
        if p != c:
            for j in range(2 * n):
                t = work[c, j]
                work[c, j] = work[p, j]
                work[p, j] = t
        piv = work[c, c]
        for j in range(2 * n):
            work[c, j] /= piv
        for r in range(n):
            if r != c:
                f = work[r, c]
                if f != 0.0:
                    for j in range(2 * n):
                        work[r, j] -= f * work[c, j]
    for i in range(n):
        for j in range(n):
            out[i, j] = work[i, n + j]


@njit(cache=True)
def _learn_kernel(row, cols, slot, mean, cov4, prec4, prec2, svar, valid, known,
                  state, eta, work, inv_work):
    """EWMA update of the nearest cell's statistics from one normal frame.

    Call after `_score_kernel` on the same row (it uses the centre in `state`
    and the derived quantities + interpolated means left in `work`).
    """
    if slot < 0 or row[cols[C_EMPTY]] > 0.5 or row[cols[C_REPEAT]] > 0.5:
        return
    phase = row[cols[C_PHASE]]
    obs = int(row[cols[C_OBS]])
    if not math.isfinite(phase) or obs < 0 or obs > 2 or known[slot, obs] == 0:
        return
    if state[S_N] == 0.0 or state[S_FRAMES] <= WARMUP_FRAMES:
        return
    nb = mean.shape[2]
    i0, i1, w, near = _bin_weights(phase, nb)
    if valid[slot, obs, near] == 0:
        return
    r = work[14:18]
    r[0] = work[0] - state[S_CX] - work[7]
    r[1] = work[1] - state[S_CY] - work[8]
    r[2] = work[2] - work[9]
    r[3] = work[3] - work[10]
    for k in range(4):
        mean[slot, obs, near, k] += eta * r[k]
    c = cov4[slot, obs, near]
    for i in range(4):
        for j in range(4):
            c[i, j] += eta * (r[i] * r[j] - c[i, j])
    _invert(c, prec4[slot, obs, near], 4, inv_work)
    _invert(c, prec2[slot, obs, near], 2, inv_work)
    sv = svar[slot, obs, near]
    for k in range(N_SCALAR):
        d = work[4 + k] - work[11 + k]
        mean[slot, obs, near, 4 + k] += eta * d
        sv[k] += eta * (d * d - sv[k])
        if sv[k] < COV_FLOOR:
            sv[k] = COV_FLOOR


@njit(cache=True)
def _score_rows_kernel(rows, cols, slot, mean, prec4, prec2, svar, rate, cprec, slip, valid,
                       known, state, out, scored, work):
    for t in range(rows.shape[0]):
        scored[t] = _score_kernel(rows[t], cols, slot, mean, prec4, prec2, svar, rate,
                                  cprec, slip, valid, known, state, out[t], work)


@njit(cache=True)
def _centres_kernel(rows, cols, slot, mean, state, out):
    """Running centre per frame (the one `_score_kernel` would score with)."""
    nb = mean.shape[2]
    for t in range(rows.shape[0]):
        row = rows[t]
        cx = state[S_CX]
        cy = state[S_CY]
        phase = row[cols[C_PHASE]]
        obs = int(row[cols[C_OBS]])
        sensor = row[cols[C_EMPTY]] > 0.5 or row[cols[C_REPEAT]] > 0.5
        if (not sensor) and obs == 0 and math.isfinite(phase):
            i0, i1, w, near = _bin_weights(phase, nb)
            ex = row[cols[C_X]] - ((1.0 - w) * mean[slot, 0, i0, 0] + w * mean[slot, 0, i1, 0])
            ey = row[cols[C_Y]] - ((1.0 - w) * mean[slot, 0, i0, 1] + w * mean[slot, 0, i1, 1])
            cx, cy = _centre_step(state, ex, ey)
        out[t, 0] = cx
        out[t, 1] = cy


# ------------------------------------------------------------------ the model


class NormalityModel:
    """Per-(type, obstacle state, phase bin) Gaussians of normal frames.

    Arrays (T types, B phase bins): `mean` (T,3,B,7), `cov4`/`prec4`
    (T,3,B,4,4), `prec2` (T,3,B,2,2), `svar` (T,3,B,3), `rate` (T,3,2),
    `count` (T,3,B), `valid` (T,3,B), `known` (T,3), detector thresholds
    `raise_thr`/`clear_thr` (T, N_GROUPS) and `video_thr` (T,). Their size
    depends on T and B only, never on the number of training frames.
    """

    def __init__(self, types: Iterable[int], phase_bins: int = DEFAULT_PHASE_BINS,
                 columns: dict[str, int] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.types = np.array(sorted(int(t) for t in types), dtype=np.int64)
        self.phase_bins = int(phase_bins)
        self.columns = dict(columns) if columns is not None else feature_columns()
        self.settings = dict(settings) if settings is not None else feature_settings()
        self.cols = _cols_array(self.columns)
        T, B = len(self.types), self.phase_bins
        self.mean = np.zeros((T, N_OBSTACLE, B, N_MEAN))
        self.cov4 = np.tile(np.eye(4), (T, N_OBSTACLE, B, 1, 1))
        self.prec4 = self.cov4.copy()
        self.prec2 = np.tile(np.eye(2), (T, N_OBSTACLE, B, 1, 1))
        self.svar = np.ones((T, N_OBSTACLE, B, N_SCALAR))
        self.rate = np.tile(np.array([1.0, 1e-4]), (T, N_OBSTACLE, 1))
        self.cprec = np.tile(np.eye(2), (T, N_OBSTACLE, B, 1, 1))
        self.slip = np.tile(np.array([0.0, 1.0]), (T, N_OBSTACLE, 1))
        self.count = np.zeros((T, N_OBSTACLE, B))
        self.valid = np.zeros((T, N_OBSTACLE, B), dtype=np.uint8)
        self.known = np.zeros((T, N_OBSTACLE), dtype=np.uint8)
        self.raise_thr = np.full((T, N_GROUPS), np.inf)
        self.clear_thr = np.full((T, N_GROUPS), np.inf)
        self.video_thr = np.full(T, np.inf)
        self.training: dict[str, Any] = {}
        self.calibration: dict[str, Any] = {}
        self._slots = {int(t): i for i, t in enumerate(self.types)}
        self._state = self.new_state()
        self._work = np.zeros(32)
        self._inv_work = np.zeros((4, 8))
        self._out = np.zeros(N_GROUPS)

    # ---- lookup

    def slot(self, type_id: int) -> int:
        """Row of `type_id` in the tables, -1 when the model does not know it."""
        return self._slots.get(int(type_id), -1)

    def has_type(self, type_id: int) -> bool:
        return int(type_id) in self._slots

    @staticmethod
    def new_state() -> np.ndarray:
        """Fresh per-video scoring state (running centre); one per stream."""
        return np.zeros(STATE_SIZE)

    @property
    def calibrated(self) -> bool:
        return bool(np.all(np.isfinite(self.raise_thr)))

    def copy(self) -> NormalityModel:
        m = NormalityModel(self.types, self.phase_bins, self.columns, self.settings)
        for name in _ARRAYS:
            setattr(m, name, getattr(self, name).copy())
        m.training = json.loads(json.dumps(self.training))
        m.calibration = json.loads(json.dumps(self.calibration))
        return m

    # ---- scoring

    def score_slot(self, slot: int, row: np.ndarray, state: np.ndarray, out: np.ndarray,
                   work: np.ndarray) -> int:
        """Hot-path form of `score_one`: 1 when the process groups were judged."""
        return _score_kernel(row, self.cols, slot, self.mean, self.prec4, self.prec2,
                             self.svar, self.rate, self.cprec, self.slip, self.valid,
                             self.known, state, out, work)

    def score_one(self, type_id: int, row: np.ndarray, state: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Per-group scores (see `GROUPS`) of one feature row, O(1).

        `state` is the video's running-centre state (`new_state()`); without
        it a model-owned state is used (one stream). `out` is filled and
        returned (a model-owned array when omitted: copy it to keep it).
        """
        if state is None:
            state = self._state
        if out is None:
            out = self._out
        self.score_slot(self.slot(type_id), row, state, out, self._work)
        return out

    def learn_slot(self, slot: int, row: np.ndarray, state: np.ndarray, work: np.ndarray,
                   eta: float = DEFAULT_LEARN_RATE) -> None:
        """Hot-path form of `learn_one`; call right after `score_slot` on the same row."""
        _learn_kernel(row, self.cols, slot, self.mean, self.cov4, self.prec4, self.prec2,
                      self.svar, self.valid, self.known, state, eta, work, self._inv_work)

    def learn_one(self, type_id: int, row: np.ndarray, state: np.ndarray | None = None,
                  eta: float = DEFAULT_LEARN_RATE) -> None:
        """Adapt the row's cell slowly (EWMA, rate `eta`) towards a frame judged normal.

        Scores the row first (to place it against the running centre), so do
        not call `score_one` and `learn_one` both on the same row with the same
        state; the pipeline uses `score_slot` + `learn_slot` instead.
        """
        if state is None:
            state = self._state
        slot = self.slot(type_id)
        if self.score_slot(slot, row, state, self._out, self._work):
            self.learn_slot(slot, row, state, self._work, eta)

    def score_rows(self, type_id: int, rows: np.ndarray,
                   state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a whole video's rows, (n, N_GROUPS), and the judged flags (n,)."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        out = np.zeros((len(rows), N_GROUPS))
        scored = np.zeros(len(rows), dtype=np.uint8)
        if state is None:
            state = self.new_state()
        _score_rows_kernel(rows, self.cols, self.slot(type_id), self.mean, self.prec4,
                           self.prec2, self.svar, self.rate, self.cprec, self.slip, self.valid,
                           self.known, state, out, scored, np.zeros(32))
        return out, scored

    # ---- fitting

    @classmethod
    def fit(cls, videos: Iterable[tuple[int, np.ndarray]], phase_bins: int = DEFAULT_PHASE_BINS,
            iterations: int = 2, columns: dict[str, int] | None = None,
            settings: dict[str, Any] | None = None) -> NormalityModel:
        """Fit from normal videos given as (type_id, feature rows (n, N_FEATURES)).

        Each item must be one whole video from its first frame (the running
        centre restarts per video). The centre needs the mean trajectory and
        the trajectory needs centres: the first pass centres each video on its
        mean position, later passes on the streaming centre the scorer uses.
        """
        videos = [(int(t), np.ascontiguousarray(r, dtype=np.float64)) for t, r in videos]
        if not videos:
            raise ModelError("no normal videos to fit the model on")
        model = cls({t for t, _ in videos}, phase_bins, columns, settings)
        model._fit_pass(videos, centres=None)
        for _ in range(iterations):
            model._fit_pass(videos, centres="stream")
        model._fit_comb(videos)
        model.training = {
            "types": [int(t) for t in model.types],
            "videos": len(videos),
            "frames": int(sum(len(r) for _, r in videos)),
            "videos_per_type": {str(t): sum(1 for tt, _ in videos if tt == t)
                                for t in model.types.tolist()},
        }
        return model

    def _prepare(self, slot: int, rows: np.ndarray, centres: str | None):
        c = self.columns
        x = np.zeros((len(rows), N_MEAN))
        x[:, 0] = rows[:, c["X"]]
        x[:, 1] = rows[:, c["Y"]]
        x[:, 2] = rows[:, c["VX"]]
        x[:, 3] = rows[:, c["VY"]]
        li = np.log(np.maximum(rows[:, c["INTENSITY"]], 0.0) + 1.0)
        x[:, 4] = li
        x[:, 5] = li - np.log(np.maximum(rows[:, c["PEAK"]], 0.0) + 1.0)
        x[:, 6] = np.log(np.hypot(x[:, 2], x[:, 3]) + SPEED_OFFSET)
        phase = rows[:, c["PHASE"]]
        obs = rows[:, c["OBSTACLE"]].astype(np.int64)
        ok = ((rows[:, c["EMPTY"]] < 0.5) & (rows[:, c["REPEAT"]] < 0.5)
              & np.isfinite(phase) & (obs >= 0) & (obs <= 2))
        ok[:WARMUP_FRAMES] = False
        gap = (rows[:, c["EMPTY"]] > 0.5) | (rows[:, c["REPEAT"]] > 0.5)
        ok[1:] &= ~gap[:-1]  # velocity across an empty/repeated frame is not a move
        for k in np.flatnonzero(np.diff(obs) != 0) + 1:
            ok[k : k + TRANSITION_FRAMES] = False  # pattern switching over at a key frame
        if centres is None:
            sel = ok & (obs == 0)
            if not sel.any():
                sel = ok
            cxy = x[sel, :2].mean(axis=0) if sel.any() else np.zeros(2)
            x[:, 0] -= cxy[0]
            x[:, 1] -= cxy[1]
        else:
            cen = np.zeros((len(rows), 2))
            _centres_kernel(rows, self.cols, slot, self.mean, self.new_state(), cen)
            x[:, :2] -= cen
        return x, np.where(ok, phase, 0.0), obs, ok

    def _fit_pass(self, videos, centres: str | None) -> None:
        T, B = len(self.types), self.phase_bins
        ncell = T * N_OBSTACLE * B
        prepared = []
        for t, rows in videos:
            slot = self.slot(t)
            x, phase, obs, ok = self._prepare(slot, rows, centres)
            prepared.append((slot, x[ok], phase[ok], obs[ok]))
        X = np.concatenate([p[1] for p in prepared])
        ph = np.concatenate([p[2] for p in prepared])
        ob = np.concatenate([p[3] for p in prepared])
        sl = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in prepared])
        oks = [self._ok_mask(rows) for _, rows in videos]
        rate_all = np.concatenate([
            rows[ok, self.columns["RATE"]] for (_, rows), ok in zip(videos, oks, strict=True)])
        u = ph * B / CYCLE_FRAMES - 0.5
        fl = np.floor(u)
        w = u - fl
        i0 = fl.astype(np.int64) % B
        i1 = (i0 + 1) % B
        near = np.where(w >= 0.5, i1, i0)
        base = (sl * N_OBSTACLE + ob) * B
        # means by linear binning (each frame feeds its two neighbouring bin centres)
        W = (np.bincount(base + i0, 1.0 - w, ncell) + np.bincount(base + i1, w, ncell))
        S = np.zeros((ncell, N_MEAN))
        for k in range(N_MEAN):
            S[:, k] = (np.bincount(base + i0, (1.0 - w) * X[:, k], ncell)
                       + np.bincount(base + i1, w * X[:, k], ncell))
        W3 = W.reshape(T, N_OBSTACLE, B)
        mean = np.zeros((T, N_OBSTACLE, B, N_MEAN))
        S3 = S.reshape(T, N_OBSTACLE, B, N_MEAN)
        grid = np.arange(B, dtype=np.float64)
        for s in range(T):
            for o in range(N_OBSTACLE):
                have = W3[s, o] > 1e-9
                if not have.any():
                    continue
                m = S3[s, o][have] / W3[s, o][have, None]
                for k in range(N_MEAN):
                    mean[s, o, :, k] = np.interp(grid, grid[have], m[:, k], period=B)
        self.mean = mean
        # residuals against the interpolated means; covariances at the nearest bin
        mi = ((1.0 - w)[:, None] * mean[sl, ob, i0] + w[:, None] * mean[sl, ob, i1])
        R = X - mi
        cell = base + near
        n = np.bincount(cell, minlength=ncell).astype(np.float64)
        C = np.zeros((ncell, 4, 4))
        for i in range(4):
            for j in range(i, 4):
                C[:, i, j] = C[:, j, i] = np.bincount(cell, R[:, i] * R[:, j], ncell)
        V = np.zeros((ncell, N_SCALAR))
        for k in range(N_SCALAR):
            V[:, k] = np.bincount(cell, R[:, 4 + k] ** 2, ncell)
        n3 = n.reshape(T, N_OBSTACLE, B)
        C = C.reshape(T, N_OBSTACLE, B, 4, 4)
        V = V.reshape(T, N_OBSTACLE, B, N_SCALAR)
        ntot = n3.sum(axis=2)
        pooledC = C.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None, None]
        pooledV = V.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None]
        k = PRIOR_WEIGHT
        cov = (C + k * pooledC[:, :, None]) / (n3 + k)[..., None, None]
        cov = cov + COV_FLOOR * np.eye(4)
        svar = (V + k * pooledV[:, :, None]) / (n3 + k)[..., None] + COV_FLOOR
        # Laser power, spot size and scan speed vary from video to video (a per-video
        # offset much larger than the frame-to-frame noise); a z-score against the
        # within-cell variance alone would flag every other normal video. Add the
        # variance of per-video mean residuals, pooled over types (more videos).
        vid = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(prepared)])
        sel0 = ob == 0
        if len(prepared) >= 2 and sel0.any():
            nv = np.bincount(vid[sel0], minlength=len(prepared)).astype(np.float64)
            have = nv >= 20
            if have.sum() >= 2:
                between = np.zeros(N_SCALAR)
                for kk in range(N_SCALAR):
                    mv = np.bincount(vid[sel0], R[sel0, 4 + kk], len(prepared))[have] / nv[have]
                    between[kk] = mv.var(ddof=1)
                svar = svar + between
        self.count = n3
        self.cov4 = cov
        self.prec4 = np.linalg.inv(cov)
        self.prec2 = np.linalg.inv(cov[..., :2, :2])
        self.svar = svar
        self.known = (ntot >= MIN_STATE_COUNT).astype(np.uint8)
        self.valid = ((n3 >= MIN_CELL_COUNT) & (self.known[:, :, None] > 0)).astype(np.uint8)
        # phase rate per obstacle state (the same for every type)
        rate = np.tile(np.array([1.0, 1e-4]), (T, N_OBSTACLE, 1))
        robs = np.concatenate([
            rows[ok, self.columns["OBSTACLE"]].astype(np.int64)
            for (_, rows), ok in zip(videos, oks, strict=True)])
        # A video's rate is its scanner's frequency offset, not a type property, and a few
        # videos per type do not sample it: pool over all types (per obstacle state).
        # Per-type statistics raised 5 false frequency alarms in 400 s of long videos.
        for o in range(N_OBSTACLE):
            v = rate_all[robs == o]
            v = v[np.isfinite(v)]
            if len(v) >= 2:
                rate[:, o] = (v.mean(), max(v.var(), 1e-6))
        self.rate = rate

    def _fit_comb(self, videos) -> None:
        """Cycle-comb statistics. Per cell (type, obstacle state, phase bin): E[d d^T]
        of the slip-corrected move since the previous cycle (2x2, shrunk towards the
        (type, state) pool like the other covariances, inverted): it is larger at the
        corners, where one frame's move is a poor tangent. Per obstacle state: mean and
        variance of the cycle slip, pooled over all frames of all videos (all types),
        so they include each video's own precession (its scan-frequency offset)."""
        T, B = len(self.types), self.phase_bins
        S = np.zeros((T, N_OBSTACLE, B, 2, 2))
        n = np.zeros((T, N_OBSTACLE, B))
        sl: list[list[list[np.ndarray]]] = [[[] for _ in range(N_OBSTACLE)] for _ in range(T)]
        for t, rows in videos:
            slot = self.slot(t)
            out = np.zeros((len(rows), 4))
            valid = np.zeros(len(rows), dtype=np.int64)
            _comb_rows_kernel(rows, self.cols, self.new_state(), out, valid)
            ok = self._ok_mask(rows)
            obs = rows[:, self.columns["OBSTACLE"]]
            phase = rows[:, self.columns["PHASE"]]
            for o in range(N_OBSTACLE):
                sel = ok & (obs == o) & ((valid & 1) != 0)
                d = out[sel, :2]
                u = phase[sel] * B / CYCLE_FRAMES - 0.5
                fl = np.floor(u)
                b = (fl.astype(np.int64) + (u - fl >= 0.5)) % B  # nearest bin, as scored
                for i in range(2):
                    for j in range(2):
                        S[slot, o, :, i, j] += np.bincount(b, d[:, i] * d[:, j], B)
                n[slot, o] += np.bincount(b, minlength=B)
                sl[slot][o].append(out[ok & (obs == o) & ((valid & 2) != 0), 2])
        ntot = n.sum(axis=2)
        pooled = S.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None, None]
        cov = (S + PRIOR_WEIGHT * pooled[:, :, None]) / (n + PRIOR_WEIGHT)[..., None, None]
        cov = cov + COV_FLOOR * np.eye(2)
        cprec = np.linalg.inv(cov)
        cprec[ntot < MIN_STATE_COUNT] = np.eye(2)
        # The slip's per-video level is the video's own scan-frequency offset, which does
        # not depend on the workpiece type and which a few videos per type do not sample:
        # pool it over all types (per obstacle state).
        slip = np.tile(np.array([0.0, 1.0]), (T, N_OBSTACLE, 1))
        for o in range(N_OBSTACLE):
            v = np.concatenate([a for s_ in range(T) for a in sl[s_][o]] or [np.zeros(0)])
            if len(v) >= MIN_STATE_COUNT:
                slip[:, o] = (v.mean(), max(v.var(), 1e-6))
        self.cprec = cprec
        self.slip = slip

    def _ok_mask(self, rows: np.ndarray) -> np.ndarray:
        c = self.columns
        obs = rows[:, c["OBSTACLE"]]
        ok = ((rows[:, c["EMPTY"]] < 0.5) & (rows[:, c["REPEAT"]] < 0.5)
              & np.isfinite(rows[:, c["PHASE"]]) & (obs >= 0) & (obs <= 2))
        ok[:WARMUP_FRAMES] = False
        return ok

    # ---- persistence

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS}

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "groups": list(GROUPS),
            "phase_bins": self.phase_bins,
            "features": self.settings,
            "training": self.training,
            "calibration": self.calibration,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": _digest(self._arrays()),
        }

    def save(self, path: str | Path) -> Path:
        """Write arrays + JSON header to one `.npz` file (no pickle)."""
        path = Path(path)
        arrays = self._arrays()
        header = json.dumps(self.header(), sort_keys=True)
        with open(path, "wb") as fh:
            np.savez(fh, header=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, check_features: bool = True) -> NormalityModel:
        """Read a model written by `save`; raise `ModelError` if it is not usable."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except Exception as exc:  # zipfile / format errors: not a model
            raise ModelError(f"{path}: not a model file ({exc})") from None
        if "header" not in data:
            raise ModelError(f"{path}: not a model file (no header)")
        try:
            header = json.loads(bytes(data.pop("header")).decode())
        except (ValueError, UnicodeDecodeError):
            raise ModelError(f"{path}: model header is not valid JSON") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelError(f"{path}: not an lhtstream model (format {header.get('format')!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"{path}: model format version {header.get('format_version')!r}, this "
                f"lhtstream reads version {FORMAT_VERSION}; retrain with `lhtstream train`")
        if list(header.get("groups", [])) != list(GROUPS):
            raise ModelError(f"{path}: model score groups {header.get('groups')} differ from "
                             f"{list(GROUPS)}")
        missing = [n for n in _ARRAYS if n not in data]
        if missing:
            raise ModelError(f"{path}: model lacks arrays {missing}")
        if _digest(data) != header.get("sha256"):
            raise ModelError(f"{path}: model arrays do not match the header checksum "
                             "(file modified or damaged)")
        settings = header.get("features", {})
        if check_features:
            current = feature_settings()
            if settings != json.loads(json.dumps(current)):
                diff = sorted(k for k in set(settings) | set(current)
                              if settings.get(k) != current.get(k))
                raise ModelError(
                    f"{path}: model was trained with different feature settings "
                    f"({', '.join(diff)}: model {[settings.get(k) for k in diff]}, "
                    f"now {[current.get(k) for k in diff]}); retrain with `lhtstream train`")
        types = data["types"]
        model = cls(types.tolist(), int(header["phase_bins"]), settings.get("columns"), settings)
        for name in _ARRAYS:
            want = getattr(model, name)
            got = data[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ModelError(f"{path}: array {name!r} has shape {got.shape} {got.dtype}, "
                                 f"expected {want.shape} {want.dtype}")
            setattr(model, name, np.array(got))
        model.training = header.get("training", {})
        model.calibration = header.get("calibration", {})
        return model


_ARRAYS = ("types", "mean", "cov4", "prec4", "prec2", "svar", "rate", "cprec", "slip", "count",
           "valid", "known", "raise_thr", "clear_thr", "video_thr")


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
