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

Per-frame group scores (`GROUPS`; `lhtstream.kernels.scoring.score_frame` computes them,
docs/model.md says why each is there). Population groups compare the frame with the
cell's mean over normal videos; change groups with the stream's own reference at this
phase (an EWMA of the whitened residual, so already smoothed):

| group | score | normal level |
| --- | --- | --- |
| trajectory | squared Mahalanobis distance of (dx, dy) | chi2(2): mean 2 |
| move | squared Mahalanobis distance of (vx, vy) given (dx, dy) | chi2(2): mean 2 |
| intensity_low / intensity_high | -z / +z of log intensity | N(0, 1) |
| spot_size | +z of spread | N(0, 1) |
| stall | -z of log speed, on a spot slower than half its normal speed | 0 |
| frequency | abs z of rate | half-normal |
| cycle_residual | d2 of p_t - p_{t-10} minus the cycle slip (the comb) | chi2(2): mean 2 |
| cycle_slip | abs z of the consistent along-track slip per cycle | half-normal |
| image | z2 of the far share + z2 of the background (obstacle-free) | chi2(2): mean 2 |
| position_change | change EWMA of (dx, dy), squared, normalised | chi2(2): mean 2 |
| intensity_fall / _rise | -z / +z (>= 0) of the change EWMA of log intensity | half-normal |
| size_change | abs z of the change EWMA of spread | half-normal |
| image_change | change EWMA of the 5 image quantities, squared, normalised | chi2(5): mean 5 |
| sensor | 1 for an all-zero or repeated frame | 0 |

Saved as one `.npz`: the arrays by name plus a JSON header, read back with
bounds and checks (`lhtstream.model.model_file`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.kernels import features as F
from lhtstream.kernels.scoring import (
    CELL,
    CHOL,
    COMB,
    CYCLE_FRAMES,
    FREQ,
    GROUPS,
    IMAGE,
    IMAGE_CHANGE,
    INT_FALL,
    INT_HIGH,
    INT_LOW,
    INT_RISE,
    MOVE,
    N_CHANGE,
    N_GROUPS,
    N_IMAGE,
    N_MEAN,
    N_OBSTACLE,
    N_SCALAR,
    OBSTACLE_STATE,
    POS_CHANGE,
    REF_MIN,
    SCORE,
    SENSOR,
    SIZE,
    SIZE_CHANGE,
    SLIP,
    STALL,
    TRAJ,
    TRANSITION_FRAMES,
    UNJUDGED_FRAMES,
    WORK,
    change_rows,
    comb_rows,
    derived_rows,
    new_score_state,
    running_centres,
    score_rows,
    table_size,
    tables,
)
from lhtstream.model import model_file
from lhtstream.model.model_file import (
    ARRAYS,
    FILE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    PLAIN_ARRAYS,
    TABLE_LAYOUT,
    ModelError,
)

__all__ = ["adaptation_extent", "reference_shift", "COMB", "FREQ", "GROUPS", "IMAGE",
           "IMAGE_CHANGE", "INT_FALL", "INT_HIGH", "INT_LOW",
           "INT_RISE", "MOVE", "N_GROUPS", "POS_CHANGE", "SENSOR", "SIZE", "SIZE_CHANGE", "SLIP",
           "STALL", "TRAJ", "DEFAULT_LEARN_RATE", "DEFAULT_PHASE_BINS",
           "ModelError", "NormalityModel", "feature_columns", "feature_settings"]

DEFAULT_PHASE_BINS = 50
PRIOR_WEIGHT = 5.0           # frames' worth of pooled covariance mixed into each cell
MIN_CELL_COUNT = 3.0         # a cell with fewer training frames is not judged
MIN_STATE_COUNT = 50.0       # an obstacle state with fewer training frames is not judged
COV_FLOOR = 1e-4             # px^2; keeps every covariance positive definite
# Variance floors of the scalars (log intensity, spread, log speed, log area, log major,
# log minor, far share, background counts): a quantity that never varied in training
# (a constant background) is not judged to the last bit.
SCALAR_FLOOR = np.array([1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-5, 1e-3])
MIN_VIDEO_FRAMES = 20        # judged frames a video needs to count for between-video spread
DEFAULT_LEARN_RATE = 1e-3    # per update of a cell


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


# The feature columns a model depends on (recorded in its file, checked on load).
_COL_ORDER = ("X", "Y", "INTENSITY", "PEAK", "AREA", "EMPTY", "REPEAT", "MXX", "MYY", "MXY",
              "FAR", "BACKGROUND", "VX", "VY", "PHASE", "RATE", "OBSTACLE")


class _TableView:
    """A named view of the model's flat table (see `lhtstream.kernels.scoring`).

    Reading gives the view (writes go to the table the kernels read); assigning
    copies the values in, so ``model.mean = fitted`` keeps the table whole.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> np.ndarray:
        if model is None:
            return self  # type: ignore[return-value]
        return model._views[self.name]

    def __set__(self, model: Any, value: np.ndarray) -> None:
        model._views[self.name][...] = value


# ------------------------------------------------------------------ the model


class NormalityModel:
    """Per-(type, obstacle state, phase bin) Gaussians of normal frames.

    Arrays (T types, B phase bins): `mean` (T,3,B,N_MEAN), `cov4`/`prec4`
    (T,3,B,4,4), `prec2` (T,3,B,2,2), `svar` (T,3,B,N_SCALAR), `cprec` (T,3,B,2,2),
    `chol` (T,3,B,CHOL.size: the change residual's within-video covariance blocks,
    lower Cholesky factors), `valid` (T,3,B), `rate`/`slip` (T,3,2), `known` (T,3):
    named views of one flat float64 `table` that the scoring kernels read and the
    online update writes (`lhtstream.kernels.scoring`); `count` (T,3,B) and the
    detector thresholds `raise_thr`/`clear_thr` (T, N_GROUPS) and `video_thr` (T,)
    are plain arrays. Their size depends on T and B only, never on the number of
    training frames. `trained` is the table as fitted (or loaded): online learning
    of a stream's copy is bounded by it, and `adaptation` says how far it went.
    """

    mean = _TableView()
    cov4 = _TableView()
    prec4 = _TableView()
    prec2 = _TableView()
    svar = _TableView()
    cprec = _TableView()
    chol = _TableView()
    valid = _TableView()
    rate = _TableView()
    slip = _TableView()
    known = _TableView()

    def __init__(self, types: Iterable[int], phase_bins: int = DEFAULT_PHASE_BINS,
                 columns: dict[str, int] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.types = np.array(sorted(int(t) for t in types), dtype=np.int64)
        self.phase_bins = int(phase_bins)
        self.columns = dict(columns) if columns is not None else feature_columns()
        if self.columns != feature_columns():
            raise ModelError(f"model feature columns {self.columns} differ from the kernels' "
                             f"{feature_columns()}; retrain with `lhtstream train`")
        self.settings = dict(settings) if settings is not None else feature_settings()
        T, B = len(self.types), self.phase_bins
        self.table = np.zeros(table_size(T, B))
        self.table[0] = T
        self.table[1] = B
        cells, states = tables(self.table)
        self._views = {f.name: CELL.part(cells, f.name) for f in CELL}
        self._views.update({f.name: OBSTACLE_STATE.part(states, f.name) for f in OBSTACLE_STATE})
        self.cov4 = np.eye(4)
        self.prec4 = np.eye(4)
        self.prec2 = np.eye(2)
        self.svar = np.array(1.0)
        self.cprec = np.eye(2)
        self.chol = _IDENTITY_CHOL
        self.rate = np.array((1.0, 1e-4))
        self.slip = np.array((0.0, 1.0))
        self.count = np.zeros((T, N_OBSTACLE, B))
        self.raise_thr = np.full((T, N_GROUPS), np.inf)
        self.clear_thr = np.full((T, N_GROUPS), np.inf)
        self.video_thr = np.full(T, np.inf)
        self.training: dict[str, Any] = {}
        self.calibration: dict[str, Any] = {}
        self._slots = {int(t): i for i, t in enumerate(self.types)}
        self.trained = self.table.copy()
        self._between_dof = 0

    # ---- lookup

    def slot(self, type_id: int) -> int:
        """Row of `type_id` in the tables, -1 when the model does not know it."""
        return self._slots.get(int(type_id), -1)

    def has_type(self, type_id: int) -> bool:
        return int(type_id) in self._slots

    @staticmethod
    def new_state() -> np.ndarray:
        """Fresh per-video scoring state (running centre, cycle comb); one per stream."""
        return new_score_state()

    @property
    def calibrated(self) -> bool:
        """Whether `detector.calibrate` set the thresholds (some groups may be left
        unjudged, threshold inf: see `calibration["not_judged"]`)."""
        return "raise" in self.calibration

    def copy(self) -> NormalityModel:
        m = NormalityModel(self.types, self.phase_bins, self.columns, self.settings)
        m.table[:] = self.table
        m.trained = self.trained  # read only: what every copy's learning is bounded by
        for name in PLAIN_ARRAYS:
            setattr(m, name, getattr(self, name).copy())
        m.training = json.loads(json.dumps(self.training))
        m.calibration = json.loads(json.dumps(self.calibration))
        return m

    # ---- scoring (the pipeline runs the same kernels fused per frame, learning included)

    def score_rows(self, type_id: int, rows: np.ndarray,
                   state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a whole video's rows, (n, N_GROUPS), and the judged flags (n,)."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        out = np.zeros((len(rows), N_GROUPS))
        scored = np.zeros(len(rows), dtype=np.uint8)
        if state is None:
            state = self.new_state()
        score_rows(rows, self.slot(type_id), self.table, state, out, scored,
                   np.zeros(WORK.size))
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
        model._fit_change(videos)
        model.trained = model.table.copy()
        model.training = {
            "types": [int(t) for t in model.types],
            "videos": len(videos),
            "frames": int(sum(len(r) for _, r in videos)),
            "videos_per_type": {str(t): sum(1 for tt, _ in videos if tt == t)
                                for t in model.types.tolist()},
            "between_video_dof": model._between_dof,
        }
        return model

    def _prepare(self, slot: int, rows: np.ndarray, centres: str | None):
        c = self.columns
        x = np.zeros((len(rows), N_MEAN))
        derived_rows(rows, x)  # the quantities exactly as the scorer derives them
        phase = rows[:, c["PHASE"]]
        obs = rows[:, c["OBSTACLE"]].astype(np.int64)
        ok = ((rows[:, c["EMPTY"]] < 0.5) & (rows[:, c["REPEAT"]] < 0.5)
              & np.isfinite(phase) & (obs >= 0) & (obs <= 2) & np.isfinite(x).all(axis=1))
        ok[:UNJUDGED_FRAMES] = False
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
            running_centres(rows, slot, self.table, self.new_state(), cen)
            x[:, :2] -= cen
        return x, np.where(ok, phase, 0.0), obs, ok

    def _fit_pass(self, videos, centres: str | None) -> None:
        T, B = len(self.types), self.phase_bins
        ncell = T * N_OBSTACLE * B
        prepared = []
        for t, rows in videos:
            slot = self.slot(t)
            x, phase, obs, ok = self._prepare(slot, rows, centres)
            half = (np.arange(len(rows)) >= len(rows) // 2)[ok]  # which half of the video
            prepared.append((slot, x[ok], phase[ok], obs[ok], half))
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
        C: np.ndarray = np.zeros((ncell, 4, 4))
        for i in range(4):
            for j in range(i, 4):
                C[:, i, j] = C[:, j, i] = np.bincount(cell, R[:, i] * R[:, j], ncell)
        V: np.ndarray = np.zeros((ncell, N_SCALAR))
        for q in range(N_SCALAR):
            V[:, q] = np.bincount(cell, R[:, 4 + q] ** 2, ncell)
        n3 = n.reshape(T, N_OBSTACLE, B)
        C = C.reshape(T, N_OBSTACLE, B, 4, 4)
        V = V.reshape(T, N_OBSTACLE, B, N_SCALAR)
        ntot = n3.sum(axis=2)
        pooledC = C.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None, None]
        pooledV = V.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None]
        prior = PRIOR_WEIGHT
        cov = (C + prior * pooledC[:, :, None]) / (n3 + prior)[..., None, None]
        cov = cov + COV_FLOOR * np.eye(4)
        svar = (V + prior * pooledV[:, :, None]) / (n3 + prior)[..., None] + SCALAR_FLOOR
        vid = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(prepared)])
        vid_type = np.array([p[0] for p in prepared])
        svar = svar + self._between_scalars(R, vid, vid_type, ob)
        half = np.concatenate([p[4] for p in prepared])
        cov = cov + self._between_positions(R, vid, vid_type, cell, half, ncell)
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

    def _between_scalars(self, R: np.ndarray, vid: np.ndarray, vid_type: np.ndarray,
                         ob: np.ndarray) -> np.ndarray:
        """Predictive between-video variance of the scalars, (T, 3, 1, N_SCALAR).

        Laser power, spot size and scan speed vary from video to video (a per-video
        offset much larger than the frame-to-frame noise); a z-score against the
        within-cell variance alone would flag every other normal video. Per obstacle
        state, pooled over types. A video's offset is the mean of its residuals about
        its type's cell means; those means came from the type's own n_t videos, so the
        offsets scatter with n_t - 1 degrees of freedom (not n_t), and a new video also
        carries the error of the type's mean: variance sigma_b^2 (1 + 1/n_t). Estimated
        from `dof` degrees of freedom, a new video's offset is Student-t, not normal: the
        variance is widened by `_few_videos_factor(dof)`, so the tail the detector's
        thresholds sit in is as wide as the t's (x4.9 with 5 degrees of freedom, x1.2 with
        36, x1.03 with 250). With none (one video per type) it is unknown: 0 here, and
        `training["between_video_dof"]` says so (calibration does not judge the
        population groups of such a model).
        """
        T = len(self.types)
        out = np.zeros((T, N_OBSTACLE, 1, N_SCALAR))
        nvid = len(vid_type)
        self._between_dof = 0
        for o in range(N_OBSTACLE):  # inside windows the spot retraces warm metal: own spread
            sel = ob == o
            nv = np.bincount(vid[sel], minlength=nvid).astype(np.float64)
            have = nv >= MIN_VIDEO_FRAMES
            per_type = np.bincount(vid_type[have], minlength=T).astype(np.float64)
            dof = float(np.maximum(per_type - 1.0, 0.0).sum())
            if o == 0:
                self._between_dof = int(dof)
            if dof < 1:
                continue
            inflate = _few_videos_factor(dof)
            for kk in range(N_SCALAR):
                mv = np.bincount(vid[sel], R[sel, 4 + kk], nvid)[have] / nv[have]
                vt = vid_type[have]
                tmean = np.bincount(vt, mv, T) / np.maximum(per_type, 1.0)
                sigma_b2 = float(((mv - tmean[vt]) ** 2).sum() / dof)
                out[:, o, 0, kk] = (inflate * sigma_b2
                                    * (1.0 + 1.0 / np.maximum(per_type, 1.0)))
        return out

    def _between_positions(self, R: np.ndarray, vid: np.ndarray, vid_type: np.ndarray,
                           cell: np.ndarray, half: np.ndarray, ncell: int) -> np.ndarray:
        """Predictive between-video covariance of (dx, dy, vx, vy) per (type, obstacle
        window), (T, 3, 1, 4, 4) (0 for obstacle-free frames), added to the cells'
        covariance.

        Where the spot is measured at a phase depends a little on the video (spot size
        and power shape the heat trail the centroid sees, the eight's size varies), most
        inside obstacle windows, where the path retraces warm metal: measured there, a
        normal held-out video sat at 2-3 cell sd for a whole window. A video's part of a
        cell's residual is what the two halves of the video share: E[m1 m2^T] over the
        (video, cell) means of the first and second half (frame noise, and the slow phase
        wander within a video, do not carry from one half to the other), corrected for the
        type means fitted from the same n_t videos and made predictive like the scalars'
        (x n_t / (n_t - 1) (1 + 1/n_t)).
        """
        T, B = len(self.types), self.phase_bins
        out = np.zeros((T, N_OBSTACLE, 1, 4, 4))
        nvid = len(vid_type)
        key = (vid * ncell + cell) * 2 + half.astype(np.int64)
        size = nvid * ncell * 2
        nk = np.bincount(key, minlength=size).astype(np.float64).reshape(nvid * ncell, 2)
        used = np.flatnonzero((nk >= 3).all(axis=1))
        if len(used) == 0:
            return out
        m = np.zeros((len(used), 2, 4))
        for i in range(4):
            m[:, :, i] = (np.bincount(key, R[:, i], size).reshape(nvid * ncell, 2)[used]
                          / nk[used])
        c_of = used % ncell
        v_of = used // ncell
        group = (c_of // (N_OBSTACLE * B)) * N_OBSTACLE + (c_of // B) % N_OBSTACLE
        ng = T * N_OBSTACLE
        tot = np.bincount(group, minlength=ng).astype(np.float64)
        M = np.zeros((ng, 4, 4))
        for i in range(4):
            for j in range(4):
                M[:, i, j] = np.bincount(group, 0.5 * (m[:, 0, i] * m[:, 1, j]
                                                      + m[:, 1, i] * m[:, 0, j]), ng)
        for g in np.flatnonzero(tot > 0):
            if g % N_OBSTACLE == 0:
                # obstacle-free: the running centre takes each video's placement out, and
                # what is left between videos is small next to the frame noise (a normal
                # video's mean |z| 0.7-1.1); adding it would only blunt the trajectory
                # evidence (the KDE-AMD protocol's 0.05-0.14 px noise)
                continue
            nt = len(np.unique(v_of[group == g]))
            if nt < 2:
                continue
            w, v = np.linalg.eigh(M[g] / tot[g])
            b = (v * np.maximum(w, 0.0)) @ v.T
            out[g // N_OBSTACLE, g % N_OBSTACLE, 0] = b * nt / (nt - 1.0) * (1.0 + 1.0 / nt)
        return out

    def _fit_change(self, videos) -> None:
        """Within-video covariance of the change residual per cell (nearest bin, as
        scored): each training video runs through the scorer with its own reference
        (`change_rows`), the residuals go into per-cell blocks (position 2x2, log
        intensity, spread, image 5x5), shrunk towards the (type, state) pool like the
        other covariances, floored, and stored as lower Cholesky factors."""
        T, B = len(self.types), self.phase_bins
        self.chol = _IDENTITY_CHOL  # the scorer whitens with it while the residuals are made
        S = np.zeros((T, N_OBSTACLE, B, N_CHANGE, N_CHANGE))
        n = np.zeros((T, N_OBSTACLE, B))
        work = np.zeros(WORK.size)
        for t, rows in videos:
            slot = self.slot(t)
            out = np.zeros((len(rows), N_CHANGE))
            valid = np.zeros(len(rows), dtype=np.int64)
            change_rows(rows, slot, self.table, self.new_state(), out, valid, work)
            sel = valid == 1
            if not sel.any():
                continue
            obs = rows[sel, self.columns["OBSTACLE"]].astype(np.int64)
            u = rows[sel, self.columns["PHASE"]] * B / CYCLE_FRAMES - 0.5
            fl = np.floor(u)
            b = (fl.astype(np.int64) + (u - fl >= 0.5)) % B
            key = obs * B + b
            d = out[sel]
            for i in range(N_CHANGE):
                for j in range(i, N_CHANGE):
                    v = np.bincount(key, d[:, i] * d[:, j], N_OBSTACLE * B).reshape(N_OBSTACLE, B)
                    S[slot, :, :, i, j] += v
                    if j != i:
                        S[slot, :, :, j, i] += v
            n[slot] += np.bincount(key, minlength=N_OBSTACLE * B).reshape(N_OBSTACLE, B)
        ntot = n.sum(axis=2)
        pooled = S.sum(axis=2) / np.maximum(ntot, 1.0)[:, :, None, None]
        cov = (S + PRIOR_WEIGHT * pooled[:, :, None]) / (n + PRIOR_WEIGHT)[..., None, None]
        floor = np.concatenate([[COV_FLOOR, COV_FLOOR], SCALAR_FLOOR[[0, 1]],
                                SCALAR_FLOOR[3:]])
        cov = cov + np.diag(floor)
        chol = np.zeros((T, N_OBSTACLE, B, CHOL.size))
        lp = np.linalg.cholesky(cov[..., 0:2, 0:2])
        CHOL.part(chol, "pos")[...] = np.stack(
            [lp[..., 0, 0], lp[..., 1, 0], lp[..., 1, 1]], axis=-1)
        CHOL.set(chol, logi=np.sqrt(cov[..., 2, 2]), spread=np.sqrt(cov[..., 3, 3]))
        CHOL.part(chol, "image")[...] = _pack_lower(np.linalg.cholesky(cov[..., 4:, 4:]))
        # states never seen keep the identity (they are not judged: `known`)
        unseen = ntot < MIN_STATE_COUNT
        chol[unseen] = _IDENTITY_CHOL
        self.chol = chol

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
            comb_rows(rows, self.new_state(), out, valid)
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
        ok[:UNJUDGED_FRAMES] = False
        return ok

    # ---- persistence

    def _arrays(self) -> dict[str, np.ndarray]:
        """The arrays as saved (the file format predates the flat table)."""
        return {name: np.ascontiguousarray(getattr(self, name), dtype=FILE_DTYPES.get(name))
                for name in ARRAYS}

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": TABLE_LAYOUT,
            "groups": list(GROUPS),
            "phase_bins": self.phase_bins,
            "features": self.settings,
            "training": self.training,
            "calibration": self.calibration,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": model_file.digest(self._arrays()),
        }

    def save(self, path: str | Path) -> Path:
        """Write arrays + JSON header to one `.npz` file (no pickle; `model_file`)."""
        path = Path(path)
        arrays = self._arrays()
        header = json.dumps(self.header(), sort_keys=True)
        with open(path, "wb") as fh:
            payload: dict[str, Any] = {"header": np.frombuffer(header.encode(), dtype=np.uint8),
                                       **arrays}
            np.savez(fh, **payload)
        return path

    @classmethod
    def load(cls, path: str | Path, check_features: bool = True) -> NormalityModel:
        """Read a model written by `save`; `ModelError` naming the file and the field if it
        is not usable (checks and bounds: `lhtstream.model.model_file`)."""
        path = Path(path)
        header, data = model_file.read(path)
        settings = header["features"]
        if check_features:
            current = feature_settings()
            if settings != json.loads(json.dumps(current)):
                diff = sorted(k for k in set(settings) | set(current)
                              if settings.get(k) != current.get(k))
                raise ModelError(
                    f"{path}: model was trained with different feature settings "
                    f"({', '.join(diff)}: model {[settings.get(k) for k in diff]}, "
                    f"now {[current.get(k) for k in diff]}); retrain with `lhtstream train`")
        model = cls(data["types"].tolist(), header["phase_bins"], settings.get("columns"),
                    settings)
        for name in ARRAYS[1:]:  # the constructor took the types
            setattr(model, name, data[name])
        model.training = header["training"]
        model.calibration = header["calibration"]
        model.trained = model.table.copy()
        return model


def adaptation_extent(table: np.ndarray, trained: np.ndarray, slot: int) -> dict[str, float]:
    """How far online learning moved type `slot`'s cells of `table` from `trained` (the
    same model as fitted): the largest |mean - trained mean| in trained sd and the largest
    variance ratio (adapted / trained, or its inverse when smaller) over every judged
    cell and modelled quantity. The kernels bound them by ADAPT_MEAN_SD, ADAPT_VAR_RATIO."""
    cells, _ = tables(table)
    fitted, _ = tables(trained)
    c, f = CELL.view(cells[slot]), CELL.view(fitted[slot])
    ok = f.valid > 0
    if not ok.any():
        return {"mean_shift_sd": 0.0, "var_ratio": 1.0}
    var0 = np.concatenate([np.diagonal(f.cov4, axis1=-2, axis2=-1), f.svar], axis=-1)[ok]
    var = np.concatenate([np.diagonal(c.cov4, axis1=-2, axis2=-1), c.svar], axis=-1)[ok]
    shift = np.abs(c.mean - f.mean)
    ratio = var / var0
    return {"mean_shift_sd": round(float((shift[ok] / np.sqrt(var0)).max()), 3),
            "var_ratio": round(float(np.maximum(ratio, 1.0 / ratio).max()), 3)}


def reference_shift(model: NormalityModel, score_state: np.ndarray, slot: int) -> float:
    """How far a stream's own change reference (its scoring state) moved since it was
    established, in within-video sd (the median over the type's obstacle-free cells of the
    change residual's sd), the largest over its quantities; 0 before it is established."""
    s = SCORE.view(score_state)  # obstacle-free, the first reference bin
    if s.ref.weight[0, 0] < REF_MIN:
        return 0.0
    ref, ref0 = s.ref.mean[0, 0], s.ref0[0, 0]
    ch = model.chol[slot, 0][model.valid[slot, 0] > 0]
    if len(ch) == 0:
        return 0.0
    sd = np.median(_chol_sds(ch), axis=0)
    return round(float((np.abs(ref - ref0) / sd).max()), 3)


def _chol_sds(chol: np.ndarray) -> np.ndarray:
    """(n, N_CHANGE) sd of each change component from (n, CHOL.size) Cholesky factors."""
    c = CHOL.view(chol)
    out = np.zeros((len(chol), N_CHANGE))
    out[:, 0] = c.pos[:, 0]
    out[:, 1] = np.hypot(c.pos[:, 1], c.pos[:, 2])
    out[:, 2] = c.logi
    out[:, 3] = c.spread
    for i in range(N_IMAGE):
        b = i * (i + 1) // 2  # row i of the packed lower factor
        out[:, 4 + i] = np.sqrt((c.image[:, b:b + i + 1] ** 2).sum(axis=1))
    return out


#: Two-sided tail probability of a video's level the thresholds sit in: the promise of 1
#: false alarm an hour shared by ~16 groups, 240 real (15-s) videos an hour.
LEVEL_TAIL = 2.6e-4


def _few_videos_factor(dof: float) -> float:
    """(t quantile / normal quantile)^2 at LEVEL_TAIL for a variance estimated with `dof`
    degrees of freedom (Cornish-Fisher expansion of the t quantile; dof < 2: 100)."""
    if dof < 2:
        return 100.0
    z = 3.47  # the normal quantile at LEVEL_TAIL
    v = float(dof)
    t = (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))
    return (t / z) ** 2


def _pack_lower(lower: np.ndarray) -> np.ndarray:
    """(..., n, n) lower-triangular matrices packed by rows into (..., n (n + 1) / 2)."""
    rows, cols = np.tril_indices(lower.shape[-1])
    return lower[..., rows, cols]


def _identity_chol() -> np.ndarray:
    c = np.zeros(CHOL.size)
    CHOL.set(c, pos=(1.0, 0.0, 1.0), logi=1.0, spread=1.0,
             image=_pack_lower(np.eye(N_IMAGE)))
    return c


_IDENTITY_CHOL = _identity_chol()
