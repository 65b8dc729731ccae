"""Normality scoring kernels: one feature row -> per-group scores, and the online update.

The model's per-cell statistics live in one flat float64 *table* (`table_size`),
so a kernel takes one array for the whole model instead of ten (each ndarray
argument costs a Numba dispatch ~0.1-2 µs, the 5-D ones the most)::

    table = [T, B, cells (T, 3, B, CELL_SIZE) ..., states (T, 3, ST_SIZE) ...]

A cell is (type slot, obstacle state 0/1/2, phase bin); `tables(table)` gives
the two views. Per cell: mean of the `N_MEAN` modelled quantities (dx, dy, vx,
vy and the `N_SCALAR` scalars: log intensity, spread, log speed, log area, the
log sd of the spot's major and minor axes, the share of its energy away from
the spot, the background), cov4 and prec4 (4x4, row-major), prec2 (2x2), svar
(the scalars' variances), cprec (2x2, the cycle comb's precision), chol (the
Cholesky factors of the *change* residual's covariance blocks, see below) and
valid (1 = judged). Per (type, obstacle state): rate (mean, variance), slip
(mean, variance) and known (1 = judged).
`lhtstream.model.normality.NormalityModel` owns the table and exposes named
views of it; fitting is numpy code there, scoring and learning are here.

Two levels of evidence per frame:

- *population*: the frame against the cell's mean over normal videos, with the
  variance between normal videos included (laser power, spot size, placement
  differ from video to video): the groups trajectory .. cycle_slip and image;
- *change*: the frame against what this video itself looked like at the same
  phase. Each stream keeps a reference of its population residuals (position,
  intensity, spread and the image quantities) per obstacle state and coarse
  phase bin (`REF_BINS`), learned from the video's own frames; the residual
  from it, whitened by the within-video covariance the model learned (per
  cell), goes into a multivariate EWMA (`CHANGE_ALPHA`), whose normalised
  square is the change group's score (chi2 under normal operation). A fault
  that starts after the video began shows here against a reference much
  tighter than the spread between videos: a few % of light, a tenth of a
  pixel, a reflection, a dead pixel the spot crosses at some phase.

The reference learns its bins' means until `REF_FRAMES` of weight, then (if
the stream adapts) follows as an EWMA of that length, and never moves more than
`REF_BOUND` within-video sd from where it stood when it was established: a
slow fault cannot be absorbed, and how far it moved is in the pipeline status.
It learns nothing while an alarm is active.

Per-stream scoring state (float64 laid out as `SCORE`, zero at a video's start):
running centre, frame count, the previous frame's flags and obstacle state,
the cycle comb's rings, the change reference and its EWMA. Units: px, frames,
px/frame; phase in frames [0, 10).
All kernels are allocation-free; `work` is a float64 scratch laid out as `WORK`.
"""

from __future__ import annotations

import math

import numpy as np

from lhtstream.kernels.features import (
    AREA,
    BACKGROUND,
    CYCLE_FRAMES,
    EMPTY,
    FAR,
    INTENSITY,
    MXX,
    MXY,
    MYY,
    OBSTACLE,
    PEAK,
    PHASE,
    RATE,
    REPEAT,
    VX,
    VY,
    X,
    Y,
)
from lhtstream.kernels.layout import Layout, kernel

# ------------------------------------------------------------------ score groups

# Score groups (columns of the score vector). SENSOR stays last (the detector relies on it).
(TRAJ, MOVE, INT_LOW, INT_HIGH, SIZE, STALL, FREQ, COMB, SLIP, IMAGE,
 POS_CHANGE, INT_FALL, INT_RISE, SIZE_CHANGE, IMAGE_CHANGE, SENSOR) = range(16)
GROUPS: tuple[str, ...] = (
    "trajectory", "move", "intensity_low", "intensity_high",
    "spot_size", "stall", "frequency", "cycle_residual", "cycle_slip", "image",
    "position_change", "intensity_fall", "intensity_rise", "size_change", "image_change",
    "sensor",
)
N_GROUPS = len(GROUPS)
#: groups whose score is an EWMA already (the detector passes them through)
CHANGE_GROUPS = (POS_CHANGE, INT_FALL, INT_RISE, SIZE_CHANGE, IMAGE_CHANGE)

# Modelled quantities: dx, dy, vx, vy, then the scalars.
N_MEAN = 12
N_SCALAR = 8  # log intensity, spread, log speed, log area, log major, log minor, far, background
Q_LOGI, Q_SPREAD, Q_SPEED, Q_AREA, Q_MAJOR, Q_MINOR, Q_FAR, Q_BG = range(4, 12)
N_OBSTACLE = 3
# The change residual: position (2), log intensity, spread, image quantities (5).
N_CHANGE = 9
N_IMAGE = 5  # log area, log major, log minor, far, background

UNJUDGED_FRAMES = 100        # frames at a video's start that are not judged (phase lock, centre)
CENTRE_TAU = 500.0           # frames; time constant of the running centre
SPEED_OFFSET = 0.5           # px/frame added before log(speed): bounded score near a stop
AXIS_OFFSET = 0.01           # px^2 added to a moment before its log: bounded for a 1-px spot
D2_CLIP = 100.0              # per-frame cap so one glitch cannot dominate a smoothed score
IMAGE_CLIP = 50.0            # the same for the image group (two z's)
Z_CLIP = 10.0                # per-frame cap of a z (frequency, the change residual's parts)
LEVEL_CLIP = 20.0            # cap of the population intensity and size z: wide enough that a
                             # threshold calibrated from few videos stays reachable
STALL_CLIP = 40.0            # a stopped spot: far beyond a slow one (isolated faint frames
                             # reach a fifth of it through the detector's smoothing)
CHANGE_Z_CLIP = 40.0         # cap of the change groups' z (intensity_fall/_rise, size_change)
SLIP_CLIP = 20.0             # a 3 % frequency step is ~40 sd of the normal cycle slip
COMB_CLIP = 25.0             # lower cap for the comb: one bad frame alone cannot raise an alarm
CHANGE_CLIP = 400.0          # cap of the change groups' chi2 (a 20-sd change in every part)
TRANSITION_FRAMES = 20
STALL_SPEED_FRACTION = 0.5   # stall is judged only below this share of the cell's normal speed
SLIP_FRAMES = 5              # frames whose d the slip is fitted on (half a cycle: fast, and
MIN_SLIP_FRAMES = 3          # still several directions); valid ones needed for an estimate
# A slip is a frequency change only when it explains most of the cycle's moves d (a
# consistent along-track shift); a changed pattern shape moves points every which way.
SLIP_CONSISTENCY = 0.5       # share of sum(d.d) explained by the slip
SLIP_OVER_COMB = 3.0         # |z| of a consistent slip above which the comb is left to it
REF_BINS = 1                 # phase bins of a stream's own reference (see the module doc)
REF_MIN = 200.0              # frames before a reference is judged against
REF_FRAMES = 3000.0          # frames after which the reference follows as an EWMA (3 s)
REF_BOUND = 3.0              # within-video sd the reference may move from where it was set
CHANGE_ALPHA = 0.05          # EWMA weight of the change residual (20 frames)
CHANGE_SETTLE = 50           # frames after a key frame without change evidence: the heat
                             # trail of the previous pattern takes ~5 cycles to fade

# ------------------------------------------------------------------ the model table

# Lower Cholesky factors of the change residual's within-video covariance, by block:
# position (l00, l10, l11), log intensity (1), spread (1), image (N_IMAGE^2 packed by rows).
CHOL = Layout("chol", [("pos", 3), ("logi", 1), ("spread", 1),
                       ("image", N_IMAGE * (N_IMAGE + 1) // 2)])
CHOL_POS = CHOL.offset("pos")
CHOL_LOGI = CHOL.offset("logi")
CHOL_SPREAD = CHOL.offset("spread")
CHOL_IMAGE = CHOL.offset("image")
N_CHOL = CHOL.size
CELL = Layout("cell", [  # one (type, obstacle state, phase bin) cell of the model table
    ("mean", N_MEAN),
    ("cov4", (4, 4)),  # covariance of (dx, dy, vx, vy), row-major
    ("prec4", (4, 4)),  # its inverse
    ("prec2", (2, 2)),  # inverse of the (dx, dy) block
    ("svar", N_SCALAR),  # variances of the scalars (between videos included)
    ("cprec", (2, 2)),  # precision of the cycle comb's residual
    ("chol", CHOL),  # the change residual's within-video covariance
    ("valid", 1),  # 1.0 when the cell is judged
])
CELL_MEAN = CELL.offset("mean")
CELL_COV4 = CELL.offset("cov4")
CELL_PREC4 = CELL.offset("prec4")
CELL_PREC2 = CELL.offset("prec2")
CELL_SVAR = CELL.offset("svar")
CELL_CPREC = CELL.offset("cprec")
CELL_CHOL = CELL.offset("chol")
CELL_VALID = CELL.offset("valid")
CELL_SIZE = CELL.size
OBSTACLE_STATE = Layout("obstacle_state", [  # one (type, obstacle state) of the model table
    ("rate", 2),  # mean, variance of RATE
    ("slip", 2),  # mean, variance of the cycle slip
    ("known", 1),  # 1.0 when the (type, obstacle state) is judged
])
ST_RATE = OBSTACLE_STATE.offset("rate")
ST_SLIP = OBSTACLE_STATE.offset("slip")
ST_KNOWN = OBSTACLE_STATE.offset("known")
ST_SIZE = OBSTACLE_STATE.size
TABLE_HEAD = 2               # table[0] = T (types), table[1] = B (phase bins)


def table_size(types: int, bins: int) -> int:
    """Length of the flat model table for `types` types and `bins` phase bins."""
    return TABLE_HEAD + types * N_OBSTACLE * (bins * CELL_SIZE + ST_SIZE)


@kernel
def tables(table):
    """(cells (T, 3, B, CELL_SIZE), states (T, 3, ST_SIZE)): views of the flat table."""
    t = int(table[0])
    b = int(table[1])
    nc = t * N_OBSTACLE * b * CELL_SIZE
    cells = table[TABLE_HEAD:TABLE_HEAD + nc].reshape((t, N_OBSTACLE, b, CELL_SIZE))
    states = table[TABLE_HEAD + nc:TABLE_HEAD + nc + t * N_OBSTACLE * ST_SIZE].reshape(
        (t, N_OBSTACLE, ST_SIZE))
    return cells, states


# ------------------------------------------------------------------ scoring state

# `SCORE` fields: prev: 1 when the previous frame was empty/repeated (this frame's velocity is then
# a jump across the gap, not a move, so the frame is not judged).
# lastobs / since: obstacle state of the previous frame and frames since it changed
# (the scanner finishes the pattern it was on when a window opens or closes, so frames
# just after a key frame belong to neither pattern and are not judged).
# ring, slipring: the cycle comb, a ring of the last COMB_LAG frames' (x, y, obstacle, ok) and of
# their slip terms (d.v, v.v, d.d), indexed by frame count modulo COMB_LAG.
# ref, ref0, ew: the change reference, per obstacle state and REF_BINS bin, N_CHANGE means and their
# weight; the means where each bin was established (for REF_BOUND); and per obstacle state
# the change EWMA (frames it ran, sum of its squared weights, values): a window's EWMA does
# not restart the obstacle-free one, which goes on where it stopped.
COMB_LAG = 10                # frames per scan cycle (100 Hz scanner, 1 kHz camera)
REF_BIN = Layout("reference_bin", [("mean", N_CHANGE), ("weight", 1)])
EW = Layout("change_ewma", [
    ("n", 1),  # frames the state's EWMA has run
    ("v", 1),  # sum of its squared weights (its variance per unit)
    ("e", N_CHANGE),  # the EWMA's values
])
SCORE = Layout("score_state", [
    ("cx", 1), ("cy", 1),  # the running centre, px
    ("n", 1),  # obstacle-free frames the centre has seen
    ("frames", 1), ("prev", 1), ("lastobs", 1), ("since", 1),
    ("ring", (COMB_LAG, 4)),  # x, y, obstacle, ok
    ("slipring", (COMB_LAG, 3)),  # d.v, v.v, d.d
    ("ref", (N_OBSTACLE, REF_BINS, REF_BIN)),
    ("ref0", (N_OBSTACLE, REF_BINS, N_CHANGE)),
    ("ew", (N_OBSTACLE, EW)),
])
S_CX = SCORE.offset("cx")
S_CY = SCORE.offset("cy")
S_N = SCORE.offset("n")
S_FRAMES = SCORE.offset("frames")
S_PREV = SCORE.offset("prev")
S_LASTOBS = SCORE.offset("lastobs")
S_SINCE = SCORE.offset("since")
S_RING = SCORE.offset("ring")
S_SLIPRING = SCORE.offset("slipring")
S_REF = SCORE.offset("ref")
S_REF0 = SCORE.offset("ref0")
S_EW = SCORE.offset("ew")
REF_STRIDE = REF_BIN.size
REF_WEIGHT = REF_BIN.offset("weight")
EW_N = EW.offset("n")
EW_V = EW.offset("v")
EW_E = EW.offset("e")
EW_STRIDE = EW.size
SCORE_STATE_SIZE = SCORE.size

# work: derived quantities, interpolated means, the update's residual, the comb's output,
# the change residual and its whitened form, the Gauss-Jordan scratch of `_invert`
WORK = Layout("work", [("x", N_MEAN), ("mu", N_MEAN), ("r", 4), ("comb", 4),
                       ("change", N_CHANGE), ("z", N_CHANGE), ("invert", 32)])
W_X = WORK.offset("x")
W_MU = WORK.offset("mu")
W_R = WORK.offset("r")
W_COMB = WORK.offset("comb")
W_CHANGE = WORK.offset("change")
W_Z = WORK.offset("z")
W_INVERT = WORK.offset("invert")
WORK_SIZE = WORK.size


@kernel
def _bin_weights(phase: float, nbins: int) -> tuple[int, int, float, int]:
    """Interpolation bins (i0, i1), weight of i1, and the nearest bin."""
    u = phase * nbins / CYCLE_FRAMES - 0.5
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


@kernel
def _derived(row, x):
    """Fill the N_MEAN modelled quantities (positions not yet centred) into `x`."""
    x[0] = row[X]
    x[1] = row[Y]
    vx = row[VX]
    vy = row[VY]
    x[2] = vx
    x[3] = vy
    inten = max(row[INTENSITY], 0.0)
    li = math.log(inten + 1.0)
    x[Q_LOGI] = li
    x[Q_SPREAD] = li - math.log(max(row[PEAK], 0.0) + 1.0)
    x[Q_SPEED] = math.log(math.sqrt(vx * vx + vy * vy) + SPEED_OFFSET)
    x[Q_AREA] = math.log(max(row[AREA], 0.0) + 1.0)
    mxx = row[MXX]
    myy = row[MYY]
    mxy = row[MXY]
    half = 0.5 * (mxx + myy)
    disc = math.sqrt(max(half * half - (mxx * myy - mxy * mxy), 0.0))
    x[Q_MAJOR] = 0.5 * math.log(half + disc + AXIS_OFFSET)
    x[Q_MINOR] = 0.5 * math.log(max(half - disc, 0.0) + AXIS_OFFSET)
    x[Q_FAR] = row[FAR] / (inten + 1.0)
    x[Q_BG] = row[BACKGROUND]


@kernel
def derived_rows(rows, out):
    """`_derived` of every row (n, N_MEAN): the quantities fitting sees, as scoring does."""
    for t in range(rows.shape[0]):
        _derived(rows[t], out[t])


@kernel
def _comb_step(row, state, unusable, velocity_ok, obs, in_transition, out3):
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
    x = row[X]
    y = row[Y]
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
            vx = row[VX]
            vy = row[VY]
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
        j = k - back  # (k - back) mod COMB_LAG, without an integer division per frame
        if j < 0:
            j += COMB_LAG
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
            out3[0] -= sl * row[VX]
            out3[1] -= sl * row[VY]
    return valid


@kernel
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


@kernel
def _frame_flags(row, state):
    """Per-frame bookkeeping shared by scoring and fitting; advances the state.

    Returns (blank, unusable, after_gap, obs, in_transition): blank = camera fault
    (all-zero or byte-repeated frame); unusable = no fresh spot position (blank, or
    nothing above threshold: a stalled spot heats nothing new).
    """
    empty = row[EMPTY] > 0.5
    repeat = row[REPEAT] > 0.5
    blank = repeat or (empty and not row[PEAK] > 0.0)
    unusable = empty or repeat
    state[S_FRAMES] += 1.0
    after_gap = state[S_PREV] > 0.5
    state[S_PREV] = 1.0 if unusable else 0.0
    ov = row[OBSTACLE]
    obs = int(ov) if math.isfinite(ov) else -1
    if state[S_FRAMES] == 1.0 or obs != int(state[S_LASTOBS]):
        state[S_SINCE] = 0.0
    else:
        state[S_SINCE] += 1.0
    state[S_LASTOBS] = obs
    in_transition = state[S_FRAMES] > 1.0 and state[S_SINCE] < TRANSITION_FRAMES
    return blank, unusable, after_gap, obs, in_transition


@kernel
def comb_rows(rows, state, out, valid):
    """Batch form of the comb (for fitting): out (n, 4) = dx, dy, slip, consistency."""
    for t in range(rows.shape[0]):
        blank, unusable, after_gap, obs, in_tr = _frame_flags(rows[t], state)
        valid[t] = _comb_step(rows[t], state, unusable, not (unusable or after_gap), obs,
                              in_tr, out[t])


@kernel
def missing_frame(row, state, work):
    """Advance the scoring state over one frame that never arrived (a seq gap).

    `row` must describe a frame with nothing measured (EMPTY, X/Y NaN) in the
    obstacle state of the last frame: the frame after the gap is then not judged
    (its move spans the gap), and the comb compares positions a whole number of
    scan cycles apart in time, not in received frames.
    """
    blank, unusable, after_gap, obs, in_tr = _frame_flags(row, state)
    _comb_step(row, state, True, False, obs, in_tr, work[W_COMB:W_COMB + 4])


LEARN_NONE = -1  #: `score_frame` ref_mode: the reference learns nothing (an alarm is active)
LEARN_ESTABLISH = 0  #: ... learns only until each bin holds REF_FRAMES (adaptation off)
LEARN_FOLLOW = 1  #: ... and then follows slowly, within REF_BOUND (adaptation on)


@kernel
def score_frame(row, slot, cells, states, state, out, work, ref_mode):
    """Score one feature row into `out` (N_GROUPS); update the running centre, the comb
    and (see `LEARN_*` for `ref_mode`) the stream's change reference.

    Returns 1 when the process groups were scored, 0 when the frame cannot be
    judged (blank/repeated, warm-up, unknown cell): then they hold neutral values.
    A frame with nothing above threshold that is not all zero (a stalled spot
    heats nothing new) is judged as a stall, not as a camera fault.
    """
    nb = cells.shape[2]
    blank, unusable, after_gap, obs, in_transition = _frame_flags(row, state)
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
    out[IMAGE] = 2.0
    _neutral_change(out)
    comb = work[W_COMB:W_COMB + 4]
    cv = _comb_step(row, state, unusable, not (unusable or after_gap), obs,
                    in_transition, comb)
    phase = row[PHASE]
    if blank or slot < 0 or not math.isfinite(phase) or obs < 0 or obs > 2:
        return 0
    st = states[slot, obs]
    if st[ST_KNOWN] == 0.0:
        return 0
    if unusable:
        # faint, not blank: the spot stopped moving (no new pixels heated)
        if state[S_FRAMES] <= UNJUDGED_FRAMES:
            return 0
        out[STALL] = STALL_CLIP
        return 1
    i0, i1, w, near = _bin_weights(phase, nb)
    x = work[W_X:W_X + N_MEAN]
    mu = work[W_MU:W_MU + N_MEAN]
    _derived(row, x)
    c0 = cells[slot, obs, i0]
    c1 = cells[slot, obs, i1]
    for k in range(N_MEAN):
        mu[k] = (1.0 - w) * c0[CELL_MEAN + k] + w * c1[CELL_MEAN + k]
    # running centre: only obstacle-free frames feed it, and not those just after a key
    # frame (the scanner is still finishing the window's pattern there)
    if obs == 0 and not in_transition:
        # score against the centre before this frame moved it (no self-influence)
        cx, cy = _centre_step(state, x[0] - mu[0], x[1] - mu[1])
    else:
        cx = state[S_CX]
        cy = state[S_CY]
    cell = cells[slot, obs, near]
    if (state[S_N] == 0.0 or state[S_FRAMES] <= UNJUDGED_FRAMES or after_gap or in_transition
            or cell[CELL_VALID] == 0.0):
        return 0
    r0 = x[0] - cx - mu[0]
    r1 = x[1] - cy - mu[1]
    r2 = x[2] - mu[2]
    r3 = x[3] - mu[3]
    p2 = CELL_PREC2
    d2p = cell[p2] * r0 * r0 + 2.0 * cell[p2 + 1] * r0 * r1 + cell[p2 + 3] * r1 * r1
    rr = (r0, r1, r2, r3)
    d4 = 0.0
    for i in range(4):
        for j in range(4):
            d4 += rr[i] * cell[CELL_PREC4 + 4 * i + j] * rr[j]
    out[TRAJ] = min(d2p, D2_CLIP)
    out[MOVE] = min(max(d4 - d2p, 0.0), D2_CLIP)
    sv = CELL_SVAR - 4  # svar of quantity q is cell[sv + q]
    zi = (x[Q_LOGI] - mu[Q_LOGI]) / math.sqrt(cell[sv + Q_LOGI])
    zs = (x[Q_SPREAD] - mu[Q_SPREAD]) / math.sqrt(cell[sv + Q_SPREAD])
    zv = (x[Q_SPEED] - mu[Q_SPEED]) / math.sqrt(cell[sv + Q_SPEED])
    zi = min(max(zi, -LEVEL_CLIP), LEVEL_CLIP)
    out[INT_LOW] = -zi
    out[INT_HIGH] = zi
    out[SIZE] = min(max(zs, -LEVEL_CLIP), LEVEL_CLIP)
    if obs == 0:
        # inside an obstacle window the small pattern retraces metal it heated a moment
        # ago: the far energy and the background grow with the window's length, which
        # training's windows need not have shown (every false `image` alarm over 6.3 h
        # sat in a window longer than any trained one)
        zf = (x[Q_FAR] - mu[Q_FAR]) / math.sqrt(cell[sv + Q_FAR])
        zb = (x[Q_BG] - mu[Q_BG]) / math.sqrt(cell[sv + Q_BG])
        out[IMAGE] = min(zf * zf + zb * zb, IMAGE_CLIP)
    # stall only when the spot is really slow: a smaller or slower pattern is not a stall
    speed = math.exp(x[Q_SPEED]) - SPEED_OFFSET
    slow = speed < STALL_SPEED_FRACTION * (math.exp(mu[Q_SPEED]) - SPEED_OFFSET)
    if slow:
        out[STALL] = min(max(-zv, 0.0), STALL_CLIP)
    zr = (row[RATE] - st[ST_RATE]) / math.sqrt(st[ST_RATE + 1])
    if not math.isfinite(zr):
        zr = 0.0
    out[FREQ] = min(abs(zr), Z_CLIP)
    zl = 0.0
    if (cv & 2) != 0 and comb[3] >= SLIP_CONSISTENCY:
        zl = abs(comb[2] - st[ST_SLIP]) / math.sqrt(st[ST_SLIP + 1])
        out[SLIP] = min(zl, SLIP_CLIP)
    if (cv & 1) != 0 and not slow and zl < SLIP_OVER_COMB:
        cp = CELL_CPREC
        dx = comb[0]
        dy = comb[1]
        d2c = cell[cp] * dx * dx + 2.0 * cell[cp + 1] * dx * dy + cell[cp + 3] * dy * dy
        out[COMB] = min(d2c, COMB_CLIP)
    # a stalled spot is the stall group's (its image is not a change of look); just after
    # a key frame the heat trail is the previous pattern's
    if obs == 0 and not slow and state[S_SINCE] >= CHANGE_SETTLE:
        if _change_step(phase, obs, cell, state, work, ref_mode):
            _change_scores(state, obs, out)
    return 1


@kernel(inline="always")
def _neutral_change(out):
    out[POS_CHANGE] = 2.0
    out[INT_FALL] = 0.0
    out[INT_RISE] = 0.0
    out[SIZE_CHANGE] = 0.0
    out[IMAGE_CHANGE] = float(N_IMAGE)


@kernel(inline="always")
def _ref_bins(phase):
    u = phase * REF_BINS / CYCLE_FRAMES - 0.5
    fl = math.floor(u)
    w = u - fl
    j0 = int(fl)
    if j0 < 0:
        j0 += REF_BINS
    j1 = j0 + 1
    if j1 >= REF_BINS:
        j1 = 0
    return j0, j1, w


@kernel
def _change_step(phase, obs, cell, state, work, ref_mode):
    """The change residual of a judged frame (its population residual minus the stream's
    own reference at this phase) into work[W_CHANGE:], whitened into work[W_Z:] and fed
    to the change EWMA; then the reference learns (`ref_mode`). Returns 1 when the
    reference was established at this phase (the EWMA advanced), else 0. Call after
    `score_frame` filled the derived quantities and means in `work`."""
    x = work[W_X:W_X + N_MEAN]
    mu = work[W_MU:W_MU + N_MEAN]
    c = work[W_CHANGE:W_CHANGE + N_CHANGE]
    z = work[W_Z:W_Z + N_CHANGE]
    # population residuals; positions not centred (the reference holds the video's
    # placement, so a slow drift of the whole pattern shows, unlike in the running centre)
    c[0] = x[0] - mu[0]
    c[1] = x[1] - mu[1]
    c[2] = x[Q_LOGI] - mu[Q_LOGI]
    c[3] = x[Q_SPREAD] - mu[Q_SPREAD]
    for k in range(N_IMAGE):
        c[4 + k] = x[Q_AREA + k] - mu[Q_AREA + k]
    j0, j1, w = _ref_bins(phase)
    base = S_REF + obs * REF_BINS * REF_STRIDE
    b0 = base + j0 * REF_STRIDE
    b1 = base + j1 * REF_STRIDE
    w0 = state[b0 + REF_WEIGHT]
    w1 = state[b1 + REF_WEIGHT]
    established = w0 >= REF_MIN and w1 >= REF_MIN
    # the prediction from the frames before this one (z holds it for a moment)
    for k in range(N_CHANGE):
        z[k] = (1.0 - w) * state[b0 + k] + w * state[b1 + k]
    if ref_mode != LEARN_NONE:
        _learn_ref(state, obs, j0, 1.0 - w, c, cell, ref_mode)
        _learn_ref(state, obs, j1, w, c, cell, ref_mode)
    if not established:
        return 0
    for k in range(N_CHANGE):
        c[k] -= z[k]
    _whiten(cell, c, z)
    # the reference's own noise: residual variance (1 + 1/n) of a mean of n frames
    # (n in frames: a bin's weight counts ~one frame per cycle)
    n_eff = (1.0 - w) * min(w0, REF_FRAMES) + w * min(w1, REF_FRAMES)
    f = 1.0 / math.sqrt(1.0 + 1.0 / n_eff)
    ew = S_EW + obs * EW_STRIDE
    n = state[ew + EW_N] + 1.0
    state[ew + EW_N] = n
    a = max(CHANGE_ALPHA, 1.0 / n)
    state[ew + EW_V] = (1.0 - a) * (1.0 - a) * state[ew + EW_V] + a * a
    for k in range(N_CHANGE):
        zk = min(max(f * z[k], -Z_CLIP), Z_CLIP)
        state[ew + EW_E + k] += a * (zk - state[ew + EW_E + k])
    return 1


@kernel(inline="always")
def _change_scores(state, obs, out):
    """The change groups from obstacle state `obs`'s change EWMA (chi2 / z units under
    normal operation)."""
    ew = S_EW + obs * EW_STRIDE
    v = state[ew + EW_V]
    e = state[ew + EW_E:ew + EW_E + N_CHANGE]
    out[POS_CHANGE] = min((e[0] * e[0] + e[1] * e[1]) / v, CHANGE_CLIP)
    zi = e[2] / math.sqrt(v)
    out[INT_FALL] = min(max(-zi, 0.0), CHANGE_Z_CLIP)
    out[INT_RISE] = min(max(zi, 0.0), CHANGE_Z_CLIP)
    out[SIZE_CHANGE] = min(abs(e[3]) / math.sqrt(v), CHANGE_Z_CLIP)
    d2 = 0.0
    for k in range(N_IMAGE):
        d2 += e[4 + k] * e[4 + k]
    out[IMAGE_CHANGE] = min(d2 / v, CHANGE_CLIP)


@kernel(inline="always")
def _chol_sd(cell, k):
    """Within-video sd of change component k (from the cell's Cholesky factors)."""
    ch = CELL_CHOL
    if k == 0:
        return cell[ch + CHOL_POS]
    if k == 1:
        return math.sqrt(cell[ch + CHOL_POS + 1] ** 2 + cell[ch + CHOL_POS + 2] ** 2)
    if k == 2:
        return cell[ch + CHOL_LOGI]
    if k == 3:
        return cell[ch + CHOL_SPREAD]
    i = k - 4
    s = 0.0
    b = ch + CHOL_IMAGE + i * (i + 1) // 2
    for j in range(i + 1):
        s += cell[b + j] * cell[b + j]
    return math.sqrt(s)


@kernel(inline="always")
def _whiten(cell, c, z):
    """z = L^-1 c per block (L: the cell's lower Cholesky factors of the covariance)."""
    ch = CELL_CHOL
    z[0] = c[0] / cell[ch + CHOL_POS]
    z[1] = (c[1] - cell[ch + CHOL_POS + 1] * z[0]) / cell[ch + CHOL_POS + 2]
    z[2] = c[2] / cell[ch + CHOL_LOGI]
    z[3] = c[3] / cell[ch + CHOL_SPREAD]
    for i in range(N_IMAGE):
        b = ch + CHOL_IMAGE + i * (i + 1) // 2
        acc = c[4 + i]
        for j in range(i):
            acc -= cell[b + j] * z[4 + j]
        z[4 + i] = acc / cell[b + i]


@kernel(inline="always")
def _learn_ref(state, obs, j, wt, c, cell, ref_mode):
    """Move reference bin j (of obstacle state `obs`) towards residual c with weight wt:
    a running mean until REF_FRAMES, then (LEARN_FOLLOW) an EWMA of that length, within
    REF_BOUND within-video sd of where the bin stood when it was established."""
    if wt <= 0.0:
        return
    b = S_REF + (obs * REF_BINS + j) * REF_STRIDE
    b0 = S_REF0 + (obs * REF_BINS + j) * N_CHANGE
    wold = state[b + REF_WEIGHT]
    if wold >= REF_FRAMES and ref_mode != LEARN_FOLLOW:
        return
    wnew = wold + wt
    state[b + REF_WEIGHT] = wnew
    g = wt / min(wnew, REF_FRAMES)
    for k in range(N_CHANGE):
        state[b + k] += g * (c[k] - state[b + k])
    if wold < REF_MIN and wnew >= REF_MIN:
        for k in range(N_CHANGE):
            state[b0 + k] = state[b + k]
    elif wold >= REF_MIN:
        for k in range(N_CHANGE):
            lim = REF_BOUND * _chol_sd(cell, k)
            lo = state[b0 + k] - lim
            hi = state[b0 + k] + lim
            if state[b + k] < lo:
                state[b + k] = lo
            elif state[b + k] > hi:
                state[b + k] = hi


@kernel(inline="always")
def _invert(a, stride, out, n, work):
    """Gauss-Jordan inverse of the n x n top-left block of the row-major matrix `a`
    (row length `stride`) into the row-major n x n `out`; `work` holds 2 n^2 values."""
    m = 2 * n
    for i in range(n):
        for j in range(n):
            work[i * m + j] = a[i * stride + j]
            work[i * m + n + j] = 1.0 if i == j else 0.0
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(work[r * m + c]) > abs(work[p * m + c]):
                p = r
        if p != c:
            for j in range(m):
                t = work[c * m + j]
                work[c * m + j] = work[p * m + j]
                work[p * m + j] = t
        piv = work[c * m + c]
        for j in range(m):
            work[c * m + j] /= piv
        for r in range(n):
            if r != c:
                f = work[r * m + c]
                if f != 0.0:
                    for j in range(m):
                        work[r * m + j] -= f * work[c * m + j]
    for i in range(n):
        for j in range(n):
            out[i * n + j] = work[i * m + n + j]


ADAPT_MEAN_SD = 1.0    #: online learning keeps each cell mean within this many trained sd
ADAPT_VAR_RATIO = 1.5  #: ... and each variance within this factor of the trained one


@kernel
def learn_frame(row, slot, cells, trained, states, state, eta, work):
    """EWMA update (rate `eta` per update) of the nearest cell from one normal frame,
    bounded by the same cell of `trained` (the cells as fitted): means within
    ADAPT_MEAN_SD trained sd, variances within a factor ADAPT_VAR_RATIO.

    Call after `score_frame` on the same row (it uses the centre in `state`
    and the derived quantities + interpolated means left in `work`).
    """
    if slot < 0 or row[EMPTY] > 0.5 or row[REPEAT] > 0.5:
        return
    phase = row[PHASE]
    obs = int(row[OBSTACLE])
    if not math.isfinite(phase) or obs < 0 or obs > 2 or states[slot, obs, ST_KNOWN] == 0.0:
        return
    if state[S_N] == 0.0 or state[S_FRAMES] <= UNJUDGED_FRAMES:
        return
    nb = cells.shape[2]
    i0, i1, w, near = _bin_weights(phase, nb)
    cell = cells[slot, obs, near]
    if cell[CELL_VALID] == 0.0:
        return
    ref = trained[slot, obs, near]
    x = work[W_X:W_X + N_MEAN]
    mu = work[W_MU:W_MU + N_MEAN]
    r = work[W_R:W_R + 4]
    r[0] = x[0] - state[S_CX] - mu[0]
    r[1] = x[1] - state[S_CY] - mu[1]
    r[2] = x[2] - mu[2]
    r[3] = x[3] - mu[3]
    for k in range(4):
        m = cell[CELL_MEAN + k] + eta * r[k]
        lim = ADAPT_MEAN_SD * math.sqrt(ref[CELL_COV4 + 5 * k])
        cell[CELL_MEAN + k] = min(max(m, ref[CELL_MEAN + k] - lim), ref[CELL_MEAN + k] + lim)
    c = cell[CELL_COV4:CELL_COV4 + 16]
    for i in range(4):
        for j in range(4):
            c[4 * i + j] += eta * (r[i] * r[j] - c[4 * i + j])
    # variances within the bound: scale row and column i (keeps the matrix positive
    # definite and the correlations as learned)
    f = work[W_R:W_R + 4]  # r is no longer needed
    for i in range(4):
        ratio = c[5 * i] / ref[CELL_COV4 + 5 * i]
        f[i] = 1.0
        if ratio > ADAPT_VAR_RATIO:
            f[i] = math.sqrt(ADAPT_VAR_RATIO / ratio)
        elif ratio * ADAPT_VAR_RATIO < 1.0:
            f[i] = math.sqrt(1.0 / (ADAPT_VAR_RATIO * ratio))
    for i in range(4):
        for j in range(4):
            c[4 * i + j] *= f[i] * f[j]
    scratch = work[W_INVERT:W_INVERT + 32]
    _invert(c, 4, cell[CELL_PREC4:CELL_PREC4 + 16], 4, scratch)
    _invert(c, 4, cell[CELL_PREC2:CELL_PREC2 + 4], 2, scratch)
    for k in range(N_SCALAR):
        d = x[4 + k] - mu[4 + k]
        m0 = ref[CELL_MEAN + 4 + k]
        v0 = ref[CELL_SVAR + k]
        lim = ADAPT_MEAN_SD * math.sqrt(v0)
        m = cell[CELL_MEAN + 4 + k] + eta * d
        cell[CELL_MEAN + 4 + k] = min(max(m, m0 - lim), m0 + lim)
        v = cell[CELL_SVAR + k] + eta * (d * d - cell[CELL_SVAR + k])
        cell[CELL_SVAR + k] = min(max(v, v0 / ADAPT_VAR_RATIO), v0 * ADAPT_VAR_RATIO)


@kernel
def score_rows(rows, slot, table, state, out, scored, work):
    """Scores (n, N_GROUPS) and judged flags (n,) of consecutive rows of one video, as a
    stream with adaptation on and no alarm would score them (its reference follows)."""
    cells, states = tables(table)
    for t in range(rows.shape[0]):
        scored[t] = score_frame(rows[t], slot, cells, states, state, out[t], work, LEARN_FOLLOW)


@kernel
def change_rows(rows, slot, table, state, out, valid, work):
    """For fitting the change covariance: per row the change residual (n, N_CHANGE), scaled
    for the reference's noise like the scores, and 1 in `valid` where it was formed."""
    cells, states = tables(table)
    scores = work[W_INVERT:W_INVERT + N_GROUPS]  # scratch for the (unused) scores
    for t in range(rows.shape[0]):
        valid[t] = 0
        for o in range(N_OBSTACLE):  # counts whether the change step ran on this row
            state[S_EW + o * EW_STRIDE + EW_N] = 0.0
        if score_frame(rows[t], slot, cells, states, state, scores, work, LEARN_FOLLOW) == 1:
            obs = int(rows[t, OBSTACLE])
            if state[S_EW + obs * EW_STRIDE + EW_N] == 1.0:  # ran, reference established
                phase = rows[t, PHASE]
                j0, j1, w = _ref_bins(phase)
                base = S_REF + obs * REF_BINS * REF_STRIDE
                w0 = min(state[base + j0 * REF_STRIDE + REF_WEIGHT], REF_FRAMES)
                w1 = min(state[base + j1 * REF_STRIDE + REF_WEIGHT], REF_FRAMES)
                f = 1.0 / math.sqrt(1.0 + 1.0 / ((1.0 - w) * w0 + w * w1))
                for k in range(N_CHANGE):
                    out[t, k] = f * work[W_CHANGE + k]
                valid[t] = 1


@kernel
def running_centres(rows, slot, table, state, out):
    """Running centre per frame (the one `score_frame` would score with), (n, 2) px."""
    cells, states = tables(table)
    nb = cells.shape[2]
    for t in range(rows.shape[0]):
        row = rows[t]
        cx = state[S_CX]
        cy = state[S_CY]
        phase = row[PHASE]
        blank, unusable, after_gap, obs, in_transition = _frame_flags(row, state)
        if (not unusable) and obs == 0 and not in_transition and math.isfinite(phase):
            i0, i1, w, near = _bin_weights(phase, nb)
            c0 = cells[slot, 0, i0]
            c1 = cells[slot, 0, i1]
            ex = row[X] - ((1.0 - w) * c0[CELL_MEAN] + w * c1[CELL_MEAN])
            ey = row[Y] - ((1.0 - w) * c0[CELL_MEAN + 1] + w * c1[CELL_MEAN + 1])
            cx, cy = _centre_step(state, ex, ey)
        out[t, 0] = cx
        out[t, 1] = cy


def new_score_state() -> np.ndarray:
    """A fresh per-video scoring state (float64, `SCORE_STATE_SIZE`)."""
    return np.zeros(SCORE_STATE_SIZE)
