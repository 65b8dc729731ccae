"""Normality scoring kernels: one feature row -> per-group scores, and the online update.

The model's per-cell statistics live in one flat float64 *table* (`table_size`),
so a kernel takes one array for the whole model instead of ten (each ndarray
argument costs a Numba dispatch ~0.1-2 µs, the 5-D ones the most)::

    table = [T, B, cells (T, 3, B, CELL_SIZE) ..., states (T, 3, ST_SIZE) ...]

A cell is (type slot, obstacle state 0/1/2, phase bin); `tables(table)` gives
the two views. Per cell: mean (dx, dy, vx, vy, log intensity, spread, log
speed), cov4 and prec4 (4x4, row-major), prec2 (2x2), svar (3), cprec (2x2, the
cycle comb's precision) and valid (1 = judged). Per (type, obstacle state):
rate (mean, variance), slip (mean, variance) and known (1 = judged).
`lhtstream.model.normality.NormalityModel` owns the table and exposes named
views of it; fitting is numpy code there, scoring and learning are here.

Per-stream scoring state (`SCORE_STATE_SIZE` float64, zero at a video's start):
running centre, frame count, the previous frame's flags and obstacle state,
then the cycle comb's rings. Units: px, frames, px/frame; phase in frames [0, 10).
All kernels are allocation-free; `work` is a float64 scratch of `WORK_SIZE`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from lhtstream.kernels.features import (
    EMPTY,
    INTENSITY,
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

# ------------------------------------------------------------------ score groups

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

CYCLE_FRAMES = 10.0          # phase range [0, 10) frames
WARMUP_FRAMES = 100          # frames at a video's start that are not scored (phase lock, centre)
CENTRE_TAU = 500.0           # frames; time constant of the running centre
SPEED_OFFSET = 0.5           # px/frame added before log(speed): bounded score near a stop
D2_CLIP = 50.0               # per-frame cap so one glitch cannot dominate a smoothed score
Z_CLIP = 10.0
SLIP_CLIP = 20.0             # a 3 % frequency step is ~40 sd of the normal cycle slip
COMB_CLIP = 25.0             # lower cap for the comb: one bad frame alone cannot raise an alarm
COV_FLOOR = 1e-4             # px^2; keeps every covariance positive definite
TRANSITION_FRAMES = 20
STALL_SPEED_FRACTION = 0.5   # stall is judged only below this share of the cell's normal speed
SLIP_FRAMES = 5              # frames whose d the slip is fitted on (half a cycle: fast, and
MIN_SLIP_FRAMES = 3          # still several directions); valid ones needed for an estimate
# A slip is a frequency change only when it explains most of the cycle's moves d (a
# consistent along-track shift); a changed pattern shape moves points every which way.
SLIP_CONSISTENCY = 0.5       # share of sum(d.d) explained by the slip
SLIP_OVER_COMB = 3.0         # |z| of a consistent slip above which the comb is left to it

# ------------------------------------------------------------------ the model table

CELL_MEAN = 0                # 7: dx, dy, vx, vy, log intensity, spread, log speed
CELL_COV4 = 7                # 16: 4x4 covariance of (dx, dy, vx, vy), row-major
CELL_PREC4 = 23              # 16: its inverse
CELL_PREC2 = 39              # 4: inverse of the (dx, dy) block
CELL_SVAR = 43               # 3: variances of the scalar quantities
CELL_CPREC = 46              # 4: precision of the cycle comb's residual
CELL_VALID = 50              # 1: 1.0 when the cell is judged
CELL_SIZE = 51
ST_RATE = 0                  # 2: mean, variance of RATE
ST_SLIP = 2                  # 2: mean, variance of the cycle slip
ST_KNOWN = 4                 # 1: 1.0 when the (type, obstacle state) is judged
ST_SIZE = 5
TABLE_HEAD = 2               # table[0] = T (types), table[1] = B (phase bins)


def table_size(types: int, bins: int) -> int:
    """Length of the flat model table for `types` types and `bins` phase bins."""
    return TABLE_HEAD + types * N_OBSTACLE * (bins * CELL_SIZE + ST_SIZE)


@njit(cache=True, nogil=True)
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

# S_PREV: 1 when the previous frame was empty/repeated (this frame's velocity is then
# a jump across the gap, not a move, so the frame is not judged).
# S_LASTOBS / S_SINCE: obstacle state of the previous frame and frames since it changed
# (the scanner finishes the pattern it was on when a window opens or closes, so frames
# just after a key frame belong to neither pattern and are not judged).
# Then the cycle comb: a ring of the last COMB_LAG frames' (x, y, obstacle, ok) and of
# their slip terms (d.v, v.v, d.d), indexed by frame count modulo COMB_LAG.
S_CX, S_CY, S_N, S_FRAMES, S_PREV, S_LASTOBS, S_SINCE = range(7)
COMB_LAG = 10                # frames per scan cycle (100 Hz scanner, 1 kHz camera)
S_RING = 7                   # COMB_LAG x (x, y, obstacle, ok)
S_SLIPRING = S_RING + 4 * COMB_LAG   # COMB_LAG x (d.v, v.v, d.d)
SCORE_STATE_SIZE = S_SLIPRING + 3 * COMB_LAG

# work layout: 0..6 derived quantities, 7..13 interpolated means, 14..17 residual of the
# update, 20..23 the comb's output, 32..63 the 4x8 Gauss-Jordan scratch of `_invert`
W_COMB = 20
W_INVERT = 32
WORK_SIZE = 64


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _derived(row, out7):
    """Fill the 7 modelled quantities except the centring of dx, dy."""
    out7[0] = row[X]
    out7[1] = row[Y]
    vx = row[VX]
    vy = row[VY]
    out7[2] = vx
    out7[3] = vy
    inten = row[INTENSITY]
    peak = row[PEAK]
    li = math.log(max(inten, 0.0) + 1.0)
    out7[4] = li
    out7[5] = li - math.log(max(peak, 0.0) + 1.0)
    out7[6] = math.log(math.sqrt(vx * vx + vy * vy) + SPEED_OFFSET)


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def comb_rows(rows, state, out, valid):
    """Batch form of the comb (for fitting): out (n, 4) = dx, dy, slip, consistency."""
    for t in range(rows.shape[0]):
        blank, unusable, after_gap, obs, in_tr = _frame_flags(rows[t], state)
        valid[t] = _comb_step(rows[t], state, unusable, not (unusable or after_gap), obs,
                              in_tr, out[t])


@njit(cache=True, nogil=True)
def missing_frame(row, state, work):
    """Advance the scoring state over one frame that never arrived (a seq gap).

    `row` must describe a frame with nothing measured (EMPTY, X/Y NaN) in the
    obstacle state of the last frame: the frame after the gap is then not judged
    (its move spans the gap), and the comb compares positions a whole number of
    scan cycles apart in time, not in received frames.
    """
    blank, unusable, after_gap, obs, in_tr = _frame_flags(row, state)
    _comb_step(row, state, True, False, obs, in_tr, work[W_COMB:W_COMB + 4])


@njit(cache=True, nogil=True)
def score_frame(row, slot, cells, states, state, out, work):
    """Score one feature row into `out` (N_GROUPS); update the running centre and comb.

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
        if state[S_FRAMES] <= WARMUP_FRAMES:
            return 0
        out[STALL] = Z_CLIP
        return 1
    i0, i1, w, near = _bin_weights(phase, nb)
    x = work
    _derived(row, x)
    # interpolated means into work[7:14]
    c0 = cells[slot, obs, i0]
    c1 = cells[slot, obs, i1]
    for k in range(N_MEAN):
        x[7 + k] = (1.0 - w) * c0[CELL_MEAN + k] + w * c1[CELL_MEAN + k]
    # running centre: only obstacle-free frames feed it
    if obs == 0:
        # score against the centre before this frame moved it (no self-influence)
        cx, cy = _centre_step(state, x[0] - x[7], x[1] - x[8])
    else:
        cx = state[S_CX]
        cy = state[S_CY]
    cell = cells[slot, obs, near]
    if (state[S_N] == 0.0 or state[S_FRAMES] <= WARMUP_FRAMES or after_gap or in_transition
            or cell[CELL_VALID] == 0.0):
        return 0
    r0 = x[0] - cx - x[7]
    r1 = x[1] - cy - x[8]
    r2 = x[2] - x[9]
    r3 = x[3] - x[10]
    p2 = CELL_PREC2
    d2p = cell[p2] * r0 * r0 + 2.0 * cell[p2 + 1] * r0 * r1 + cell[p2 + 3] * r1 * r1
    rr = (r0, r1, r2, r3)
    d4 = 0.0
    for i in range(4):
        for j in range(4):
            d4 += rr[i] * cell[CELL_PREC4 + 4 * i + j] * rr[j]
    out[TRAJ] = min(d2p, D2_CLIP)
    out[MOVE] = min(max(d4 - d2p, 0.0), D2_CLIP)
    zi = (x[4] - x[11]) / math.sqrt(cell[CELL_SVAR])
    zs = (x[5] - x[12]) / math.sqrt(cell[CELL_SVAR + 1])
    zv = (x[6] - x[13]) / math.sqrt(cell[CELL_SVAR + 2])
    zi = min(max(zi, -Z_CLIP), Z_CLIP)
    out[INT_LOW] = -zi
    out[INT_HIGH] = zi
    out[SIZE] = min(max(zs, -Z_CLIP), Z_CLIP)
    # stall only when the spot is really slow: a smaller or slower pattern is not a stall
    speed = math.exp(x[6]) - SPEED_OFFSET
    slow = speed < STALL_SPEED_FRACTION * (math.exp(x[13]) - SPEED_OFFSET)
    if slow:
        out[STALL] = min(max(-zv, 0.0), Z_CLIP)
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
    return 1


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
def learn_frame(row, slot, cells, states, state, eta, work):
    """EWMA update (rate `eta` per update) of the nearest cell from one normal frame.

    Call after `score_frame` on the same row (it uses the centre in `state`
    and the derived quantities + interpolated means left in `work`).
    """
    if slot < 0 or row[EMPTY] > 0.5 or row[REPEAT] > 0.5:
        return
    phase = row[PHASE]
    obs = int(row[OBSTACLE])
    if not math.isfinite(phase) or obs < 0 or obs > 2 or states[slot, obs, ST_KNOWN] == 0.0:
        return
    if state[S_N] == 0.0 or state[S_FRAMES] <= WARMUP_FRAMES:
        return
    nb = cells.shape[2]
    i0, i1, w, near = _bin_weights(phase, nb)
    cell = cells[slot, obs, near]
    if cell[CELL_VALID] == 0.0:
        return
    r = work[14:18]
    r[0] = work[0] - state[S_CX] - work[7]
    r[1] = work[1] - state[S_CY] - work[8]
    r[2] = work[2] - work[9]
    r[3] = work[3] - work[10]
    for k in range(4):
        cell[CELL_MEAN + k] += eta * r[k]
    c = cell[CELL_COV4:CELL_COV4 + 16]
    for i in range(4):
        for j in range(4):
            c[4 * i + j] += eta * (r[i] * r[j] - c[4 * i + j])
    scratch = work[W_INVERT:W_INVERT + 32]
    _invert(c, 4, cell[CELL_PREC4:CELL_PREC4 + 16], 4, scratch)
    _invert(c, 4, cell[CELL_PREC2:CELL_PREC2 + 4], 2, scratch)
    for k in range(N_SCALAR):
        d = work[4 + k] - work[11 + k]
        cell[CELL_MEAN + 4 + k] += eta * d
        cell[CELL_SVAR + k] += eta * (d * d - cell[CELL_SVAR + k])
        if cell[CELL_SVAR + k] < COV_FLOOR:
            cell[CELL_SVAR + k] = COV_FLOOR


@njit(cache=True, nogil=True)
def score_rows(rows, slot, table, state, out, scored, work):
    """Scores (n, N_GROUPS) and judged flags (n,) of consecutive rows of one video."""
    cells, states = tables(table)
    for t in range(rows.shape[0]):
        scored[t] = score_frame(rows[t], slot, cells, states, state, out[t], work)


@njit(cache=True, nogil=True)
def running_centres(rows, slot, table, state, out):
    """Running centre per frame (the one `score_frame` would score with), (n, 2) px."""
    cells, states = tables(table)
    nb = cells.shape[2]
    for t in range(rows.shape[0]):
        row = rows[t]
        cx = state[S_CX]
        cy = state[S_CY]
        phase = row[PHASE]
        obs = int(row[OBSTACLE])
        sensor = row[EMPTY] > 0.5 or row[REPEAT] > 0.5
        if (not sensor) and obs == 0 and math.isfinite(phase):
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
