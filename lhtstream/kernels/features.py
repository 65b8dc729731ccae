"""Per-frame feature kernels (Numba), the online cycle-phase tracker and the ring buffer.

One code path serves streaming and batch: the fused per-frame step
(`lhtstream.kernels.step`) and `video_features` / `track` call the same two
kernels, `measure_frame` (pixels -> measurements) and `track_step` (the
sequential part: carry-forward, velocity, phase), so the batch features used for
training equal the streamed ones to the bit.

Units: positions in ROI pixels (x = column, y = row, origin at the top-left
pixel centre), time in frames (1 frame = 1 ms), phase in frames in [0, 10).

Cycle phase. The spot's row y has a period of 10 frames (one 100 Hz scan
cycle) and is an even function of the phase with its minimum (top edge) at
phase 0, so its fundamental is ``-A cos(2 pi phase / 10)``. The tracker is a
quadrature demodulator with a numerically controlled oscillator (NCO):
each valid frame's ``(y - centre) * exp(-i 2 pi p / 10)`` (p = NCO phase) goes
into an EWMA phasor Z; ``angle(-Z)`` is the offset of the true phase from the
NCO and the reported phase is ``p + offset``. A proportional-integral loop
moves the NCO towards the signal (rotating Z by the same amount, so the
reported phase does not jump) and corrects RATE, so a drifting scan frequency
is followed with no lag once locked. The image term (the fundamental's
negative-frequency half) is subtracted from each sample before averaging so a
short time constant does not leave a ripple. The loop only learns from valid
frames: non-empty, not repeated, outside obstacle windows (there the pattern
changes shape while the scanner period stays 10 ms), and not in the
`SETTLE_FRAMES` after an obstacle key frame (the scanner finishes the pattern
it was on).

Inside an obstacle window the loop does not coast open-loop: the scanner's
clock wanders (real galvos do; the simulator's rate has a random walk), so a
free-running NCO drifts by up to a frame over a 2-s window, and every
phase-keyed statistic (cells, the comb) goes wrong. The window's pattern is
unknown but repeats every 10 frames, so the tracker locks to the pattern
itself: after the window settles it averages `WINDOW_ACQUIRE` frames of the
first two harmonics of x and y (four phasors, against the NCO) as a
*reference*, and from then on the least-squares phase shift of the current
phasors against that reference (weighted by harmonic number and amplitude) is
the loop's error. The reference is taken a few cycles into the window, when the
NCO is still locked from the obstacle-free part, so the phase stays continuous
with it; the rate keeps being corrected, so when the window ends there is no
phase error to pull in (a pull-in moves RATE by ~0.5 %, which is not the
scanner's frequency changing).
"""

from __future__ import annotations

import math
import time

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.kernels.layout import Layout, kernel

# ------------------------------------------------------------------ columns

X = 0  #: spot centroid column, px (carried forward on an empty frame)
Y = 1  #: spot centroid row, px
INTENSITY = 2  #: sum of pixel values above the threshold, counts
PEAK = 3  #: maximum pixel value of the frame, counts
AREA = 4  #: number of pixels above the threshold, px
EMPTY = 5  #: 1.0 when no pixel is above the threshold
REPEAT = 6  #: 1.0 when the frame is byte-identical to the previous non-empty frame
SPREAD = 7  #: RMS radius of the above-threshold weights around the centroid, px
MXX = 8  #: weighted second central moments of the above-threshold pixels, px^2
MYY = 9
MXY = 10
FAR = 11  #: counts of above-threshold pixels farther than FAR_RADIUS from the centroid
BACKGROUND = 12  #: mean value of the pixels at or below the threshold, counts per pixel
VX = 13  #: position change since the previous frame, px/frame
VY = 14
PHASE = 15  #: cycle phase, frames in [0, 10)
CYCLE = 16  #: completed cycles since the stream (video) started
RATE = 17  #: phase advance per frame (1.0 at exactly 100 Hz)
OBSTACLE = 18  #: obstacle state of the frame, 0/1/2
CX = 19  #: running centre of the pattern (EWMA of valid positions), px
CY = 20
LOCK = 21  #: phase-lock quality in [0, 1]: share of y's variance in the 10-frame fundamental
N_FEATURES = 22

COLUMNS: tuple[str, ...] = (
    "x", "y", "intensity", "peak", "area", "empty", "repeat", "spread",
    "mxx", "myy", "mxy", "far", "background",
    "vx", "vy", "phase", "cycle", "rate", "obstacle", "cx", "cy", "lock",
)
#: columns set by measure_frame (the pixels' evidence; the rest is sequential)
MEASURED = (X, Y, INTENSITY, PEAK, AREA, EMPTY, REPEAT, SPREAD, MXX, MYY, MXY, FAR, BACKGROUND)

FAR_RADIUS = 3.5  #: px; "away from the spot": beyond this distance from the centroid

CYCLE_FRAMES = 10.0  #: nominal frames per scan cycle
DEFAULT_THRESHOLD = 8.0  #: counts; see measure_frame

# ---------------------------------------------------------------- tracker state

_W_SIZE = 14
TRACK = Layout("track_state", [  # build one with new_track_state
    ("last_x", 1),  # last known position (NaN until the first non-empty frame)
    ("last_y", 1),
    ("nco", 1),  # NCO phase, frames in [0, 10)
    ("rate", 1),  # NCO rate, frames/frame
    ("zre", 1),  # demodulated phasor (EWMA)
    ("zim", 1),
    ("var", 1),  # EWMA of (y - centre)^2
    ("cx", 1),
    ("cy", 1),
    ("nvalid", 1),  # valid frames the loop has learned from
    ("cycle", 1),  # completed cycles
    ("turn", 1),  # highest whole turn of the unwrapped phase counted so far
    ("nco_turns", 1),  # whole turns of the NCO
    ("started", 1),  # 0 before the first frame
    # configuration (kept in the state so one compiled kernel serves every setting)
    ("alpha", 1),  # floor of the phasor EWMA weight
    ("alpha_centre", 1),  # floor of the centre EWMA weight
    ("kp", 1),  # proportional gain (fraction of the offset moved into the NCO per frame)
    ("ki", 1),  # integral gain (rate correction per frame of offset)
    ("acquire", 1),  # valid frames before the loop closes
    ("min_lock", 1),  # below this LOCK the loop does not steer
    ("rate_min", 1),
    ("rate_max", 1),
    # the in-window loop (see the module doc)
    ("obs", 1),  # obstacle state of the previous frame (-1 before the first)
    ("since", 1),  # frames since the obstacle state changed
    ("wn", 1),  # valid in-window frames learned since the window settled
    ("wz", _W_SIZE),  # raw phasors (x, y at harmonics 1, 2), the NCO's own (1, 2), means x, y
    ("wref", 8),  # the 4 centred phasors at WINDOW_ACQUIRE (re, im)
    ("ring_n", 1),  # consecutive valid samples in the main loop's cycle ring (<= 10)
    ("ring_i", 1),  # where the next one goes
    ("ring", 20),  # the last cycle's demodulated samples (re, im)
])
_S_LAST_X = TRACK.offset("last_x")
_S_LAST_Y = TRACK.offset("last_y")
_S_NCO = TRACK.offset("nco")
_S_RATE = TRACK.offset("rate")
_S_ZRE = TRACK.offset("zre")
_S_ZIM = TRACK.offset("zim")
_S_VAR = TRACK.offset("var")
_S_CX = TRACK.offset("cx")
_S_CY = TRACK.offset("cy")
_S_NVALID = TRACK.offset("nvalid")
_S_CYCLE = TRACK.offset("cycle")
_S_TURN = TRACK.offset("turn")
_S_NCO_TURNS = TRACK.offset("nco_turns")
_S_STARTED = TRACK.offset("started")
_S_ALPHA = TRACK.offset("alpha")
_S_ALPHA_CENTRE = TRACK.offset("alpha_centre")
_S_KP = TRACK.offset("kp")
_S_KI = TRACK.offset("ki")
_S_ACQUIRE = TRACK.offset("acquire")
_S_MIN_LOCK = TRACK.offset("min_lock")
_S_RATE_MIN = TRACK.offset("rate_min")
_S_RATE_MAX = TRACK.offset("rate_max")
_S_OBS = TRACK.offset("obs")
_S_SINCE = TRACK.offset("since")
_S_WN = TRACK.offset("wn")
_S_WZ = TRACK.offset("wz")
_S_WREF = TRACK.offset("wref")
_S_RING_N = TRACK.offset("ring_n")
_S_RING_I = TRACK.offset("ring_i")
_S_RING = TRACK.offset("ring")
TRACK_STATE_SIZE = TRACK.size

SETTLE_FRAMES = 20  #: frames after an obstacle key frame the loops do not learn from
WINDOW_ACQUIRE = 50  #: in-window frames averaged into the window loop's reference
WINDOW_ALPHA = 0.02  #: EWMA weight floor of the window phasors (50-frame time constant)

_TWO_PI_OVER_CYCLE = 2.0 * math.pi / CYCLE_FRAMES


class FeatureError(LhtstreamError, ValueError):
    """Input that the feature kernels cannot take (wrong dtype, shape, length)."""


def new_track_state(
    alpha: float = 0.08,
    alpha_centre: float = 0.02,
    kp: float = 0.02,
    ki: float = 2e-4,
    acquire: float = 30,
    min_lock: float = 0.3,
    rate_min: float = 0.85,
    rate_max: float = 1.15,
) -> np.ndarray:
    """A fresh tracker state (float64, `TRACK_STATE_SIZE`) with the loop settings.

    alpha: EWMA weight floor of the phasor (1/alpha frames time constant);
    alpha_centre: same for the running centre; kp, ki: loop gains (per frame,
    per frame^2); acquire: valid frames averaged before the loop closes;
    min_lock: LOCK below which the loop coasts; rate_min/max: RATE clamp.
    """
    s = np.zeros(TRACK_STATE_SIZE, dtype=np.float64)
    s[_S_LAST_X] = np.nan
    s[_S_LAST_Y] = np.nan
    s[_S_RATE] = 1.0
    s[_S_CX] = np.nan
    s[_S_CY] = np.nan
    s[_S_ALPHA] = alpha
    s[_S_ALPHA_CENTRE] = alpha_centre
    s[_S_KP] = kp
    s[_S_KI] = ki
    s[_S_ACQUIRE] = acquire
    s[_S_MIN_LOCK] = min_lock
    s[_S_RATE_MIN] = rate_min
    s[_S_RATE_MAX] = rate_max
    s[_S_OBS] = -1.0
    return s


# ---------------------------------------------------------------- kernels


@kernel
def measure_frame(frame, previous, threshold, row):
    """Measure one difference frame into `row` (the `MEASURED` columns); no allocation.

    Centroid weights are ``value - threshold`` for pixels strictly above the
    threshold: a pixel crossing the threshold then enters with weight ~0, so
    the centroid is a continuous function of the pixel values and noise
    pixels near the threshold barely pull it (plain ``value`` weights would
    add a jump of ``threshold`` each time one flickers across). INTENSITY is
    the sum of the raw values of those pixels, PEAK the frame's maximum,
    MXX/MYY/MXY the weights' central second moments (the spot's shape: a
    streak along the motion, wider when out of focus), FAR the raw counts of
    those pixels more than `FAR_RADIUS` from the centroid (a reflection, a hot
    pixel, spatter, stray light: energy away from the spot) and BACKGROUND the
    mean of all other pixels (sensor noise, banding, glow below the threshold).
    An empty frame gets X = Y = NaN (the tracker carries the last position) and
    moments, FAR NaN. `previous` (same shape, uint16) holds the last non-empty
    frame: REPEAT is 1 when this non-empty frame equals it byte for byte, then it
    is updated.
    """
    rows, cols = frame.shape
    sw = 0.0
    swx = 0.0
    swy = 0.0
    swxx = 0.0
    swyy = 0.0
    swxy = 0.0
    total = 0.0
    background = 0.0
    peak = 0
    area = 0
    rmin = rows
    rmax = -1
    cmin = cols
    cmax = -1
    same = True
    for r in range(rows):
        for c in range(cols):
            v = frame[r, c]
            if v != previous[r, c]:
                same = False
            if v > peak:
                peak = v
            if v > threshold:
                w = v - threshold
                sw += w
                swx += w * c
                swy += w * r
                swxx += w * (c * c)
                swyy += w * (r * r)
                swxy += w * (r * c)
                total += v
                area += 1
                if r < rmin:
                    rmin = r
                if r > rmax:
                    rmax = r
                if c < cmin:
                    cmin = c
                if c > cmax:
                    cmax = c
            else:
                background += v
    row[INTENSITY] = total
    row[PEAK] = peak
    row[AREA] = area
    row[BACKGROUND] = background / max(rows * cols - area, 1)
    if area == 0:
        row[X] = np.nan
        row[Y] = np.nan
        row[SPREAD] = np.nan
        row[MXX] = np.nan
        row[MYY] = np.nan
        row[MXY] = np.nan
        row[FAR] = np.nan
        row[EMPTY] = 1.0
        row[REPEAT] = 0.0
        return
    x = swx / sw
    y = swy / sw
    mxx = max(swxx / sw - x * x, 0.0)
    myy = max(swyy / sw - y * y, 0.0)
    row[X] = x
    row[Y] = y
    row[SPREAD] = math.sqrt(mxx + myy)
    row[MXX] = mxx
    row[MYY] = myy
    row[MXY] = swxy / sw - x * y
    # energy away from the spot: only the box of above-threshold pixels can hold it
    far = 0.0
    r2 = FAR_RADIUS * FAR_RADIUS
    for r in range(rmin, rmax + 1):
        dy = r - y
        for c in range(cmin, cmax + 1):
            v = frame[r, c]
            if v > threshold:
                dx = c - x
                if dx * dx + dy * dy > r2:
                    far += v
    row[FAR] = far
    row[EMPTY] = 0.0
    if same:
        row[REPEAT] = 1.0
    else:
        row[REPEAT] = 0.0
        for r in range(rows):
            for c in range(cols):
                previous[r, c] = frame[r, c]


@kernel
def track_step(state, row):
    """Sequential features of one frame from its measurements and OBSTACLE; no allocation.

    Reads X, Y, EMPTY, REPEAT, OBSTACLE of `row`; writes X, Y (carried
    forward when empty), VX, VY, PHASE, CYCLE, RATE, CX, CY, LOCK and updates
    `state` (from `new_track_state`).
    """
    started = state[_S_STARTED] != 0.0
    last_x = state[_S_LAST_X]
    last_y = state[_S_LAST_Y]
    x = row[X]
    y = row[Y]
    measured = not (math.isnan(x) or math.isnan(y))
    if not measured:
        x = last_x
        y = last_y
    # velocity is 0 where either end is unknown
    if math.isnan(x) or math.isnan(last_x):
        vx = 0.0
        vy = 0.0
    else:
        vx = x - last_x
        vy = y - last_y
    row[X] = x
    row[Y] = y
    row[VX] = vx
    row[VY] = vy
    state[_S_LAST_X] = x
    state[_S_LAST_Y] = y

    # advance the NCO to this frame's mid-exposure
    rate = state[_S_RATE]
    nco = state[_S_NCO]
    if started:
        nco += rate
        if nco >= CYCLE_FRAMES:
            nco -= CYCLE_FRAMES
            state[_S_NCO_TURNS] += 1.0
    state[_S_STARTED] = 1.0
    zre = state[_S_ZRE]
    zim = state[_S_ZIM]
    var = state[_S_VAR]

    obstacle = row[OBSTACLE]
    if obstacle != state[_S_OBS]:
        state[_S_OBS] = obstacle
        # a video's first frame is no key frame: nothing to settle from
        state[_S_SINCE] = 0.0 if started else SETTLE_FRAMES
        state[_S_WN] = 0.0
    else:
        state[_S_SINCE] += 1.0
    fresh = measured and row[REPEAT] == 0.0 and state[_S_SINCE] >= SETTLE_FRAMES
    if fresh and obstacle != 0.0 and state[_S_NVALID] > state[_S_ACQUIRE]:
        nco, rate = _window_step(state, x, y, nco, rate)

    valid = fresh and obstacle == 0.0
    rn = 0.0
    a = 0.0
    n = state[_S_NVALID]
    if not valid:
        state[_S_RING_N] = 0.0  # the ring holds consecutive samples only
    else:
        a = max(state[_S_ALPHA], 1.0 / (n + 1.0))
        ac = max(state[_S_ALPHA_CENTRE], 1.0 / (n + 1.0))
        if math.isnan(state[_S_CX]):
            state[_S_CX] = x
            state[_S_CY] = y
        else:
            state[_S_CX] += ac * (x - state[_S_CX])
            state[_S_CY] += ac * (y - state[_S_CY])
        d = y - state[_S_CY]
        ang = _TWO_PI_OVER_CYCLE * nco
        c = math.cos(ang)
        s = math.sin(ang)
        var += a * (d * d - var)
        # d * exp(-i ang) into the ring of the last cycle: the mean of ten consecutive
        # samples is exactly y's fundamental (every other harmonic of a 10-frame
        # pattern sums to zero over them), so the phase carries no ripple that depends
        # on which phases the samples sit at (that ripple would differ after a window,
        # when the samples have precessed, and jolt the phase)
        k = int(state[_S_RING_I])
        state[_S_RING + 2 * k] = d * c
        state[_S_RING + 2 * k + 1] = -d * s
        state[_S_RING_I] = (k + 1) % 10
        rn = min(state[_S_RING_N] + 1.0, 10.0)
        state[_S_RING_N] = rn
    if valid and rn == 10.0:
        pre = 0.0
        pim = 0.0
        for j in range(10):
            pre += state[_S_RING + 2 * j]
            pim += state[_S_RING + 2 * j + 1]
        zre += a * (0.1 * pre - zre)
        zim += a * (0.1 * pim - zim)
        n += 1.0
        state[_S_NVALID] = n
        mag2 = zre * zre + zim * zim
        lock = 2.0 * mag2 / var if var > 0.0 else 0.0
        if lock > 1.0:
            lock = 1.0
        offset = math.atan2(-zim, -zre) / _TWO_PI_OVER_CYCLE
        acquire = state[_S_ACQUIRE]
        delta = 0.0
        if n == acquire:
            delta = offset  # close the loop: move the whole offset into the NCO
        elif n > acquire and lock >= state[_S_MIN_LOCK]:
            delta = state[_S_KP] * offset
            rate += state[_S_KI] * offset
            rate = min(max(rate, state[_S_RATE_MIN]), state[_S_RATE_MAX])
        if delta != 0.0:
            nco = _advance_nco(state, nco, delta)
            # rotate Z by -delta so that nco + offset (the reported phase) is unchanged
            ang = _TWO_PI_OVER_CYCLE * delta
            c = math.cos(ang)
            s = math.sin(ang)
            zre, zim = zre * c + zim * s, zim * c - zre * s
            for j in range(10):  # the ring's samples are phasors against the NCO too
                rr = state[_S_RING + 2 * j]
                ri = state[_S_RING + 2 * j + 1]
                state[_S_RING + 2 * j] = rr * c + ri * s
                state[_S_RING + 2 * j + 1] = ri * c - rr * s
    if valid:
        state[_S_ZRE] = zre
        state[_S_ZIM] = zim
        state[_S_VAR] = var
        state[_S_RATE] = rate
    state[_S_NCO] = nco

    if zre == 0.0 and zim == 0.0:
        offset = 0.0
        lock = 0.0
    else:
        offset = math.atan2(-zim, -zre) / _TWO_PI_OVER_CYCLE
        lock = 2.0 * (zre * zre + zim * zim) / var if var > 0.0 else 0.0
        if lock > 1.0:
            lock = 1.0
    phase = nco + offset
    turns = state[_S_NCO_TURNS]
    if phase >= CYCLE_FRAMES:
        phase -= CYCLE_FRAMES
        turns += 1.0
    elif phase < 0.0:
        phase += CYCLE_FRAMES
        turns -= 1.0
    # CYCLE counts forward crossings of phase 0 only, so jitter around 0 never counts twice
    if turns > state[_S_TURN]:
        state[_S_CYCLE] += turns - state[_S_TURN]
        state[_S_TURN] = turns
    row[PHASE] = phase
    row[CYCLE] = state[_S_CYCLE]
    row[RATE] = rate
    row[CX] = state[_S_CX]
    row[CY] = state[_S_CY]
    row[LOCK] = lock


@kernel(inline="always")
def _advance_nco(state, nco, delta):
    nco += delta
    if nco >= CYCLE_FRAMES:
        nco -= CYCLE_FRAMES
        state[_S_NCO_TURNS] += 1.0
    elif nco < 0.0:
        nco += CYCLE_FRAMES
        state[_S_NCO_TURNS] -= 1.0
    return nco


@kernel
def _window_step(state, x, y, nco, rate):
    """One valid in-window frame of the window loop; returns the new (nco, rate).

    Demodulates x and y at harmonics 1 and 2 about their own weighted mean: with
    the same EWMA weights for the raw phasors (x e^{-ik ang}), the oscillator's
    phasors (e^{-ik ang}) and the means, ``raw - mean * osc`` is exactly the
    demodulation of (x - mean), even over the first partial cycles (a running
    centre there would bias the reference).
    """
    wn = state[_S_WN]
    a = max(WINDOW_ALPHA, 1.0 / (wn + 1.0))
    z = _S_WZ
    if wn == 0.0:
        for j in range(_W_SIZE):
            state[z + j] = 0.0
    ang = _TWO_PI_OVER_CYCLE * nco
    c1 = math.cos(ang)
    s1 = math.sin(ang)
    c2 = c1 * c1 - s1 * s1
    s2 = 2.0 * s1 * c1
    # raw phasors x1, y1, x2, y2 (re, im), oscillator phasors 1, 2 (re, im), means x, y
    state[z] += a * (x * c1 - state[z])
    state[z + 1] += a * (-x * s1 - state[z + 1])
    state[z + 2] += a * (y * c1 - state[z + 2])
    state[z + 3] += a * (-y * s1 - state[z + 3])
    state[z + 4] += a * (x * c2 - state[z + 4])
    state[z + 5] += a * (-x * s2 - state[z + 5])
    state[z + 6] += a * (y * c2 - state[z + 6])
    state[z + 7] += a * (-y * s2 - state[z + 7])
    state[z + 8] += a * (c1 - state[z + 8])
    state[z + 9] += a * (-s1 - state[z + 9])
    state[z + 10] += a * (c2 - state[z + 10])
    state[z + 11] += a * (-s2 - state[z + 11])
    state[z + 12] += a * (x - state[z + 12])
    state[z + 13] += a * (y - state[z + 13])
    wn += 1.0
    state[_S_WN] = wn
    if wn < WINDOW_ACQUIRE:
        return nco, rate
    r = _S_WREF
    if wn == WINDOW_ACQUIRE:
        for h in range(4):
            zr, zi = _window_phasor(state, h)
            state[r + 2 * h] = zr
            state[r + 2 * h + 1] = zi
        return nco, rate
    # phase error: least squares over the phasors, Z_k ~ REF_k exp(i k 2 pi e / 10); for
    # small e: e = sum k Im(Z conj(REF)) / sum k^2 |Z| |REF| (radians of harmonic 1)
    num = 0.0
    den = 0.0
    for h in range(4):
        k = 1.0 if h < 2 else 2.0
        zr, zi = _window_phasor(state, h)
        rr = state[r + 2 * h]
        ri = state[r + 2 * h + 1]
        num += k * (zi * rr - zr * ri)
        den += k * k * math.sqrt((zr * zr + zi * zi) * (rr * rr + ri * ri))
    if den <= 0.0:
        return nco, rate
    e = num / den / _TWO_PI_OVER_CYCLE
    delta = state[_S_KP] * e
    rate = min(max(rate + state[_S_KI] * e, state[_S_RATE_MIN]), state[_S_RATE_MAX])
    state[_S_RATE] = rate
    nco = _advance_nco(state, nco, delta)
    # the NCO moved by delta: every phasor against it turns by -k delta
    ang = _TWO_PI_OVER_CYCLE * delta
    c1 = math.cos(ang)
    s1 = math.sin(ang)
    c2 = c1 * c1 - s1 * s1
    s2 = 2.0 * s1 * c1
    for j in range(6):  # x1, y1, x2, y2, osc1, osc2
        c = c1 if j == 0 or j == 1 or j == 4 else c2
        sn = s1 if j == 0 or j == 1 or j == 4 else s2
        zr = state[z + 2 * j]
        zi = state[z + 2 * j + 1]
        state[z + 2 * j] = zr * c + zi * sn
        state[z + 2 * j + 1] = zi * c - zr * sn
    return nco, rate


@kernel(inline="always")
def _window_phasor(state, h):
    """Phasor h (0: x1, 1: y1, 2: x2, 3: y2) of the window loop about the signal's mean."""
    z = _S_WZ
    osc = z + 8 if h < 2 else z + 10
    mean = state[z + 12] if h % 2 == 0 else state[z + 13]
    return (state[z + 2 * h] - mean * state[osc],
            state[z + 2 * h + 1] - mean * state[osc + 1])


@kernel
def _features_loop(video, obstacles, threshold, previous, state, out):
    for i in range(video.shape[0]):
        row = out[i]
        measure_frame(video[i], previous, threshold, row)
        row[OBSTACLE] = obstacles[i]
        track_step(state, row)


@kernel
def _measure_loop(video, threshold, previous, out):
    for i in range(video.shape[0]):
        measure_frame(video[i], previous, threshold, out[i])


@kernel
def _track_loop(obstacles, state, out):
    for i in range(out.shape[0]):
        row = out[i]
        row[OBSTACLE] = obstacles[i]
        track_step(state, row)


# ---------------------------------------------------------------- ring buffer


class RingBuffer:
    """Fixed-capacity history of float64 rows; O(1) push, `latest(n)` as a view.

    Every row is stored twice, at ``i`` and ``i + capacity`` of a
    ``(2 * capacity, width)`` array, so the last n rows are always one
    contiguous slice. Views stay valid until overwritten (`capacity` pushes on).
    `count` (a 0-d float64 array, e.g. a field of a stream's kernel state)
    holds the number of rows pushed, so compiled writers can push too (they fill
    both copies and advance it; `lhtstream.kernels.step`).
    """

    def __init__(self, capacity: int, width: int = N_FEATURES,
                 count: np.ndarray | None = None) -> None:
        if capacity < 1 or width < 1:
            raise FeatureError(f"ring buffer needs capacity and width >= 1, got {capacity}x{width}")
        self.capacity = int(capacity)
        self.width = int(width)
        self.buffer = np.full((2 * self.capacity, self.width), np.nan, dtype=np.float64)
        self._count = np.zeros(()) if count is None else count
        self._count[()] = 0.0

    @property
    def total(self) -> int:
        """Rows pushed since creation / clear."""
        return int(self._count[()])

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    def push(self, row: np.ndarray) -> np.ndarray:
        """Append a copy of `row`; returns the stored row (a view)."""
        i = self.total % self.capacity
        self.buffer[i] = row
        self.buffer[i + self.capacity] = row
        self._count[()] += 1.0
        return self.buffer[i + self.capacity]

    def latest(self, n: int | None = None) -> np.ndarray:
        """The last `n` rows (default: all held), oldest first, as a view (no copy)."""
        held = len(self)
        if n is None:
            n = held
        if n < 0 or n > held:
            raise FeatureError(f"ring buffer holds {held} rows, asked for {n}")
        end = (self.total - 1) % self.capacity + 1 + self.capacity if self.total else 0
        return self.buffer[end - n:end]

    def clear(self) -> None:
        """Forget the history (O(1): rows before it are never shown again)."""
        self._count[()] = 0.0


# ---------------------------------------------------------------- batch


def _check_video(video: np.ndarray) -> np.ndarray:
    if not isinstance(video, np.ndarray) or video.dtype != np.uint16 or video.ndim != 3:
        raise FeatureError(
            f"video must be a (frames, rows, cols) uint16 array, got "
            f"{getattr(video, 'dtype', type(video).__name__)} {getattr(video, 'shape', '')}"
        )
    return np.ascontiguousarray(video)


def _check_obstacles(obstacles: np.ndarray | None, n: int) -> np.ndarray:
    if obstacles is None:
        return np.zeros(n, dtype=np.float64)
    obs = np.asarray(obstacles)
    if obs.shape != (n,):
        raise FeatureError(f"obstacle states must have shape ({n},), got {obs.shape}")
    return obs.astype(np.float64)


def measure_video(video: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Measurements (the `MEASURED` columns) of every frame; the other columns are NaN."""
    video = _check_video(video)
    out = np.full((video.shape[0], N_FEATURES), np.nan, dtype=np.float64)
    previous = np.zeros(video.shape[1:], dtype=np.uint16)
    _measure_loop(video, float(threshold), previous, out)
    return out


def track(
    measurements: np.ndarray, obstacles: np.ndarray | None = None, **tracker: float
) -> np.ndarray:
    """Rerun the sequential stage over measurements (e.g. with perturbed X/Y); returns a copy."""
    m = np.asarray(measurements, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != N_FEATURES:
        raise FeatureError(f"measurements must have shape (n, {N_FEATURES}), got {m.shape}")
    out = np.array(m, dtype=np.float64, order="C", copy=True)
    _track_loop(_check_obstacles(obstacles, out.shape[0]), new_track_state(**tracker), out)
    return out


def video_features(
    video: np.ndarray,
    obstacles: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    **tracker: float,
) -> np.ndarray:
    """All features of a whole video, equal to streaming it (`kernels.step`) to the bit."""
    video = _check_video(video)
    n = video.shape[0]
    out = np.full((n, N_FEATURES), np.nan, dtype=np.float64)
    previous = np.zeros(video.shape[1:], dtype=np.uint16)
    _features_loop(video, _check_obstacles(obstacles, n), float(threshold), previous,
                   new_track_state(**tracker), out)
    return out


def warm_up() -> float:
    """Compile (or load from cache) every kernel for the array types we use; returns seconds."""
    t0 = time.perf_counter()
    video = np.zeros((3, 2, 3), dtype=np.uint16)
    video[0, 1, 1] = 100
    obstacles = np.zeros(3, dtype=np.float64)
    meas = measure_video(video)
    track(meas, obstacles)
    video_features(video, obstacles)
    # frames decoded from the wire are read-only buffers: a separate specialisation
    ro = np.frombuffer(video[0].tobytes(), dtype=np.uint16).reshape(video.shape[1:])
    row = np.zeros(N_FEATURES)
    measure_frame(ro, np.zeros_like(video[0]), DEFAULT_THRESHOLD, row)
    measure_frame(video[0], np.zeros_like(video[0]), DEFAULT_THRESHOLD, row)
    track_step(new_track_state(), row)
    return time.perf_counter() - t0
