"""The fused per-frame step: features -> ring -> score -> detect -> learn in one compiled call.

A stream's whole frame-path state lives in four preallocated arrays, owned by
`lhtstream.service.pipeline.StreamPipeline`:

- ``state`` (float64, laid out as `STREAM`): tracker, scoring state, the last
  scores, scratch, detector (`lhtstream.kernels.detection`) and the stream's
  settings (slot, threshold, adapt, learn rate, ring count and capacity);
- ``prev`` (uint16, at least rows x cols of the frame): the REPEAT reference;
- ``ring`` (float64, 2 x capacity x `N_FEATURES`, flat): the feature history,
  each row stored twice so the last n rows are one contiguous slice;
- ``table`` (float64): the model (`lhtstream.kernels.scoring`), the stream's
  private copy (online learning writes it).

All four are 1-D (a 1-D argument costs Numba's dispatcher the least; every
kernel reshapes views inside). `frame_step` does one frame and returns the
number of alarm-kind changes (0: nothing happened, build no event);
`feature_step` only measures and tracks (a stream without a model yet);
`block` runs the same code over consecutive frames of one video, from pixels or
(the KDE-AMD protocol's perturbed positions) from measured rows, and stops after
the first frame with a change; `lost_frames` advances the tracker and the scoring
state over frames that never arrived. No kernel allocates; the features are the
ones `video_features` computes, bit for bit.
"""

from __future__ import annotations

import math

from lhtstream.kernels.detection import (
    D_RAISE,
    D_SMOOTH,
    DET,
    DET_SIZE,
    any_active,
    detect_step,
)
from lhtstream.kernels.features import (
    AREA,
    EMPTY,
    INTENSITY,
    MEASURED,
    N_FEATURES,
    OBSTACLE,
    PEAK,
    REPEAT,
    TRACK,
    TRACK_STATE_SIZE,
    measure_frame,
    track_step,
)
from lhtstream.kernels.layout import Layout, kernel
from lhtstream.kernels.scoring import (
    LEARN_ESTABLISH,
    LEARN_FOLLOW,
    LEARN_NONE,
    N_GROUPS,
    S_LASTOBS,
    SCORE,
    SCORE_STATE_SIZE,
    WORK,
    WORK_SIZE,
    learn_frame,
    missing_frame,
    score_frame,
    tables,
)

STREAM = Layout("stream_state", [
    ("track", TRACK),
    ("score", SCORE),
    ("scores", N_GROUPS),  # the last frame's group scores
    ("work", WORK),
    ("det", DET),
    ("gap_row", N_FEATURES),  # the feature row of a frame that never arrived
    ("slot", 1),  # the type's row in the model table
    ("threshold", 1),  # counts; see measure_frame
    ("adapt", 1),  # 1.0: learn from judged frames while no alarm is active
    ("learn_rate", 1),  # EWMA rate per cell update
    ("ring_total", 1),  # rows pushed into the ring since the video started
    ("ring_capacity", 1),  # rows the ring holds
])
S_TRACK = STREAM.offset("track")
S_SCORE = STREAM.offset("score")
S_SCORES = STREAM.offset("scores")
S_WORK = STREAM.offset("work")
S_DET = STREAM.offset("det")
S_GAP_ROW = STREAM.offset("gap_row")
P_SLOT = STREAM.offset("slot")
P_THRESHOLD = STREAM.offset("threshold")
P_ADAPT = STREAM.offset("adapt")
P_LEARN_RATE = STREAM.offset("learn_rate")
P_RING_TOTAL = STREAM.offset("ring_total")
P_RING_CAPACITY = STREAM.offset("ring_capacity")
STREAM_STATE_SIZE = STREAM.size


@kernel(inline="always")
def _push_row(ring, state):
    """The ring's next row and its mirror (views); advances the ring's count."""
    cap = int(state[P_RING_CAPACITY])
    total = int(state[P_RING_TOTAL])
    a = (total % cap) * N_FEATURES
    b = a + cap * N_FEATURES
    state[P_RING_TOTAL] = total + 1
    return ring[a:a + N_FEATURES], ring[b:b + N_FEATURES]


@kernel(inline="always")
def _mirror(row, mirror):
    for j in range(N_FEATURES):
        mirror[j] = row[j]


@kernel(inline="always")
def _features(frame, obstacle, prev, ring, state):
    """Measure and track one frame into the ring; returns its (mirrored) row."""
    row, mirror = _push_row(ring, state)
    rows, cols = frame.shape
    measure_frame(frame, prev[:rows * cols].reshape((rows, cols)), state[P_THRESHOLD], row)
    row[OBSTACLE] = obstacle
    track_step(state[S_TRACK:S_TRACK + TRACK_STATE_SIZE], row)
    _mirror(row, mirror)
    return mirror


@kernel(inline="always")
def _level(det, level, i):
    # the frame's highest smoothed score relative to its raise threshold (for plots)
    if level.shape[0] == 0:
        return
    best = -math.inf
    for g in range(N_GROUPS):
        r = det[D_SMOOTH + g] / det[D_RAISE + g]
        if r > best:
            best = r
    level[i] = best


@kernel(inline="always")
def _ref_mode(state, det):
    # the stream's own reference learns nothing while an alarm is active, and follows
    # slowly once established only where the stream adapts
    if any_active(det):
        return LEARN_NONE
    return LEARN_FOLLOW if state[P_ADAPT] != 0.0 else LEARN_ESTABLISH


@kernel
def frame_step(frame, obstacle, prev, ring, state, table, trained):
    """One frame (uint16 rows x cols) in obstacle state 0/1/2: #alarm-kind changes (0: none).

    `table` is the stream's model (online learning writes it), `trained` the model as
    fitted (read only: it bounds how far learning may move the cells)."""
    cells, states = tables(table)
    fitted, _ = tables(trained)
    mstate = state[S_SCORE:S_SCORE + SCORE_STATE_SIZE]
    scores = state[S_SCORES:S_SCORES + N_GROUPS]
    work = state[S_WORK:S_WORK + WORK_SIZE]
    det = state[S_DET:S_DET + DET_SIZE]
    slot = int(state[P_SLOT])
    row = _features(frame, obstacle, prev, ring, state)
    # the analysis, as in `block` (written out: a helper taking these views costs a
    # reference count per array per frame)
    scored = score_frame(row, slot, cells, states, mstate, scores, work, _ref_mode(state, det))
    changes = detect_step(scores, scored, det)
    if state[P_ADAPT] != 0.0 and scored == 1 and not any_active(det):
        learn_frame(row, slot, cells, fitted, states, mstate, state[P_LEARN_RATE], work)
    return changes


@kernel
def feature_step(frame, obstacle, prev, ring, state):
    """Features of one frame only (while no model is ready); the row is the ring's newest."""
    _features(frame, obstacle, prev, ring, state)


FRAMES = 0    #: `block` input: pixels (n, rows, cols) uint16
MEASURED_ROWS = 1  #: measured rows (n, N_FEATURES; the `MEASURED` columns, e.g. perturbed X/Y)


@kernel
def block(kind, frames, rows, obstacles, start, prev, ring, state, table, trained, level):
    """`frame_step` over consecutive frames of one video from index `start` on.

    `kind` says what the input is: `FRAMES` (`frames`, with `prev`) or `MEASURED_ROWS`
    (`rows`: tracked here); the unused input may be empty. `obstacles` (n,) int gives
    each frame's obstacle state.
    Returns the index of the first frame with an alarm-kind change, or n. `level` (n,)
    gets each frame's highest smoothed score / raise threshold, unless it is empty.
    """
    cells, states = tables(table)
    fitted, _ = tables(trained)
    track = state[S_TRACK:S_TRACK + TRACK_STATE_SIZE]
    mstate = state[S_SCORE:S_SCORE + SCORE_STATE_SIZE]
    scores = state[S_SCORES:S_SCORES + N_GROUPS]
    work = state[S_WORK:S_WORK + WORK_SIZE]
    det = state[S_DET:S_DET + DET_SIZE]
    slot = int(state[P_SLOT])
    n = frames.shape[0] if kind == FRAMES else rows.shape[0]
    for i in range(start, n):
        if kind == FRAMES:
            row = _features(frames[i], obstacles[i], prev, ring, state)
        else:
            new, row = _push_row(ring, state)
            for j in range(N_FEATURES):
                new[j] = math.nan
            for c in MEASURED:
                new[c] = rows[i, c]
            new[OBSTACLE] = obstacles[i]
            track_step(track, new)
            _mirror(new, row)
        scored = score_frame(row, slot, cells, states, mstate, scores, work,
                             _ref_mode(state, det))
        changes = detect_step(scores, scored, det)
        if state[P_ADAPT] != 0.0 and scored == 1 and not any_active(det):
            learn_frame(row, slot, cells, fitted, states, mstate, state[P_LEARN_RATE], work)
        _level(det, level, i)
        if changes != 0:
            return i
    return n


@kernel
def lost_frames(n, scoring, state):
    """Advance over `n` frames that never arrived (a seq gap), as frames with nothing
    measured: the tracker's oscillator keeps its rate (the phase and cycle count stay
    aligned with time) and, when `scoring`, the running centre and cycle comb count
    them (the comb compares positions whole cycles apart, the next frame's move spans
    the gap so it is not judged). The ring and the detector do not see them."""
    row = state[S_GAP_ROW:S_GAP_ROW + N_FEATURES]
    track = state[S_TRACK:S_TRACK + TRACK_STATE_SIZE]
    mstate = state[S_SCORE:S_SCORE + SCORE_STATE_SIZE]
    work = state[S_WORK:S_WORK + WORK_SIZE]
    for _ in range(n):
        for j in range(N_FEATURES):
            row[j] = math.nan
        row[INTENSITY] = 0.0
        row[PEAK] = 0.0
        row[AREA] = 0.0
        row[EMPTY] = 1.0
        row[REPEAT] = 0.0
        row[OBSTACLE] = mstate[S_LASTOBS]
        track_step(track, row)
        if scoring:
            missing_frame(row, mstate, work)
