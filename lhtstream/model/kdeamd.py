"""KDE-AMD: a numpy re-implementation of the published offline baseline.

Atienza, Bielza, Diaz, Larrañaga, "Efficient anomaly detection in a laser
surface heat treatment process by tracking the laser spot" (DESIGN section 3).
Every choice the paper leaves open is listed in ``docs/kdeamd.md``.

Pipeline: spot centre of mass per difference frame -> centre each video ->
R x C grid x obstacle window -> per (window, cell) 2-D Gaussian KDE of the
next-frame position of training moves starting there -> per video histogram of
move -log densities -> anomaly score = KL(video histogram || mean training
histogram).

The evaluation protocol (leave-one-out within a type, clean vs Gaussian
position noise) is in `lhtstream.service.kdeamd_protocol`. Units: positions
in pixels (x = column, y = row), time in frames, costs in microseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lhtstream.base.errors import LhtstreamError

__all__ = [
    "DEFAULT_CENTRE",
    "KdeAmd",
    "KdeAmdError",
    "centre_positions",
    "centres_of_mass",
    "kl_divergence",
    "measure_frame_cost",
    "spot_positions",
]

#: Where each video's mean position is moved to (px). Arbitrary: the grid
#: bounds are learned from the centred training positions.
DEFAULT_CENTRE = (0.0, 0.0)
#: Published protocol: position noise of variance 0.02 px^2.
NOISE_VARIANCE = 0.02
NOISE_SIGMA = float(np.sqrt(NOISE_VARIANCE))
#: Added to every kernel covariance (px^2) so a cell whose next positions are
#: collinear or identical still has a proper (if very peaked) density.
BANDWIDTH_RIDGE = 1e-4
_LOG_2PI = float(np.log(2.0 * np.pi))
# Query chunk for the batched kernel sums: bounds the (queries x points) matrix.
_CHUNK_ELEMENTS = 4_000_000


class KdeAmdError(LhtstreamError):
    """Bad input to KDE-AMD (empty video, no training data, shape mismatch)."""


# --------------------------------------------------------------- positions


def centres_of_mass(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centre of mass of every difference frame, no threshold.

    ``video`` is ``(frames, rows, cols)``; returns ``(frames, 2)`` float64 ``(x, y)``
    in pixels (x = column, y = row, origin at the top-left pixel centre) and the
    ``(frames,)`` mask of frames with any intensity (the others' rows are 0).
    """
    v = np.asarray(video)
    if v.ndim != 3:
        raise KdeAmdError(f"video must be (frames, rows, cols), got shape {v.shape}")
    v = v.astype(np.float64, copy=False)
    n, rows, cols = v.shape
    total = v.sum(axis=(1, 2))
    present = total > 0
    if not present.any():
        raise KdeAmdError(f"video of {n} frames has no non-zero frame: no spot to track")
    safe = np.where(present, total, 1.0)
    x = v.sum(axis=1) @ np.arange(cols, dtype=np.float64) / safe
    y = v.sum(axis=2) @ np.arange(rows, dtype=np.float64) / safe
    return np.column_stack([x, y]), present


def spot_positions(video: np.ndarray) -> np.ndarray:
    """`centres_of_mass` with every all-zero frame given the previous position; frames
    before the first non-empty one take that first position. ``(frames, 2)`` px."""
    xy, present = centres_of_mass(video)
    # Index of the last non-empty frame at or before t (first one for leading blanks).
    idx = np.where(present, np.arange(len(present)), 0)
    np.maximum.accumulate(idx, out=idx)
    first = int(np.argmax(present))
    idx[:first] = first
    return xy[idx]


def centre_positions(
    positions: np.ndarray, centre: tuple[float, float] = DEFAULT_CENTRE
) -> np.ndarray:
    """Shift a video's ``(n, 2)`` positions (px) so their mean is ``centre``."""
    p = np.asarray(positions, dtype=np.float64)
    return p - p.mean(axis=0) + np.asarray(centre, dtype=np.float64)


# ------------------------------------------------------------------- KDE


@dataclass
class _Kde:
    """One Gaussian KDE with a full bandwidth matrix H, points pre-whitened by H^-1/2."""

    white: np.ndarray  # (n, 2) points @ W, where W W^T = H^-1
    w: np.ndarray  # (2, 2)
    log_norm: float  # -log(2 pi) - 0.5 log det H  (per kernel)
    owner: np.ndarray  # (n,) training video index of each point

    @property
    def n(self) -> int:
        return int(self.white.shape[0])


def _scott_kde(points: np.ndarray, owner: np.ndarray) -> _Kde:
    """Scott's rule: H = cov(points) * n^(-2/(d+4)) (d = 2), plus a small ridge."""
    n = points.shape[0]
    if n >= 2:
        cov = np.cov(points, rowvar=False) * n ** (-1.0 / 3.0)
    else:
        cov = np.zeros((2, 2))
    cov = cov + BANDWIDTH_RIDGE * np.eye(2)
    chol = np.linalg.cholesky(cov)
    w = np.linalg.inv(chol).T  # x @ w has identity covariance under H
    log_det = 2.0 * float(np.log(np.diag(chol)).sum())
    return _Kde(points @ w, w, -_LOG_2PI - 0.5 * log_det, owner)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1)
    finite = np.isfinite(m)
    m = np.where(finite, m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - m[:, None]).sum(axis=1)) + m


def _kde_log_density(kde: _Kde, queries: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """log density of ``queries`` (m, 2); ``exclude[i]`` drops points owned by that video."""
    qw = queries @ kde.w
    out = np.empty(queries.shape[0])
    step = max(1, _CHUNK_ELEMENTS // max(kde.n, 1))
    for s in range(0, queries.shape[0], step):
        d0 = qw[s : s + step, 0, None] - kde.white[None, :, 0]
        d1 = qw[s : s + step, 1, None] - kde.white[None, :, 1]
        e = -0.5 * (d0 * d0 + d1 * d1)
        if exclude is None:
            count = np.full(e.shape[0], kde.n, dtype=np.float64)
        else:
            same = exclude[s : s + step, None] == kde.owner[None, :]
            e[same] = -np.inf
            count = (kde.n - same.sum(axis=1)).astype(np.float64)
        # No point left (all owned by the excluded video): density -inf, caller falls back.
        with np.errstate(divide="ignore"):
            lse = _logsumexp_rows(e)
            out[s : s + step] = np.where(
                count > 0, lse + kde.log_norm - np.log(np.maximum(count, 1.0)), -np.inf
            )
    return out


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q) in nats of two histograms, each smoothed as (h + eps) / sum."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum() if p.sum() > 0 else p
    q = q / q.sum() if q.sum() > 0 else q
    p = (p + eps) / (1.0 + eps * p.size)
    q = (q + eps) / (1.0 + eps * q.size)
    nz = p > 0  # 0 log 0 = 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


class KdeAmd:
    """The KDE-AMD model for one workpiece type.

    ``fit`` takes the training videos' *raw* (uncentred) positions and obstacle
    states; ``score`` returns a video's anomaly score (KL, nats; higher = more
    anomalous). ``score_move`` is one frame's evaluation, exposed for timing.
    """

    def __init__(
        self,
        rows: int = 35,
        cols: int = 35,
        lam: int = 15,
        bins: int = 40,
        bin_quantiles: tuple[float, float] = (0.001, 0.999),
        eps: float = 1e-4,
        centre: tuple[float, float] = DEFAULT_CENTRE,
        reference_moves: int = 200_000,
    ) -> None:
        self.reference_moves = int(reference_moves)
        self.rows, self.cols, self.lam = int(rows), int(cols), int(lam)
        self.bins, self.bin_quantiles, self.eps = int(bins), bin_quantiles, float(eps)
        self.centre = centre
        self._cells: dict[tuple[int, int], _Kde] = {}
        self._window_kde: dict[int, _Kde] = {}
        self._all_kde: _Kde | None = None
        self.reference: np.ndarray | None = None  # mean training histogram
        self.edges: np.ndarray | None = None  # histogram edges of -log density
        self.training_scores: np.ndarray | None = None

    # -- geometry

    def _cell(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Flat cell index row * cols + col; positions outside the bounds clip to the edge."""
        c = np.floor((x - self.x0) / self.dx).astype(np.int64)
        r = np.floor((y - self.y0) / self.dy).astype(np.int64)
        return np.clip(r, 0, self.rows - 1) * self.cols + np.clip(c, 0, self.cols - 1)

    @staticmethod
    def _moves(pos: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Moves t -> t+1: start (m, 2), end (m, 2), window of the start frame (m,)."""
        return pos[:-1], pos[1:], np.asarray(win[:-1], dtype=np.int64)

    def _check(self, positions: np.ndarray, obstacles: np.ndarray, what: str) -> np.ndarray:
        p = np.asarray(positions, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
            raise KdeAmdError(f"{what}: positions must be (frames >= 2, 2), got {p.shape}")
        if np.asarray(obstacles).shape != (p.shape[0],):
            raise KdeAmdError(
                f"{what}: obstacle states shape {np.asarray(obstacles).shape} "
                f"does not match {p.shape[0]} frames"
            )
        if not np.isfinite(p).all():
            raise KdeAmdError(f"{what}: positions contain NaN or inf")
        return centre_positions(p, self.centre)

    # -- fitting

    def fit(self, positions: Sequence[np.ndarray], obstacles: Sequence[np.ndarray]) -> KdeAmd:
        """Fit on training videos: raw ``(n, 2)`` positions (px) and ``(n,)`` states 0/1/2."""
        if len(positions) == 0 or len(positions) != len(obstacles):
            raise KdeAmdError(
                f"fit needs >= 1 training video with obstacle states "
                f"({len(positions)} position series, {len(obstacles)} state series)"
            )
        cen = [self._check(p, o, f"training video {i}") for i, (p, o) in
               enumerate(zip(positions, obstacles, strict=True))]
        allp = np.concatenate(cen)
        # Grid bounds: the bounding box of all centred training positions.
        self.x0, self.y0 = allp.min(axis=0)
        span = np.maximum(allp.max(axis=0) - allp.min(axis=0), 1e-9)
        self.dx, self.dy = span[0] / self.cols, span[1] / self.rows

        starts, ends, wins, owners = [], [], [], []
        for i, (p, o) in enumerate(zip(cen, obstacles, strict=True)):
            s, e, w = self._moves(p, o)
            starts.append(s)
            ends.append(e)
            wins.append(w)
            owners.append(np.full(len(s), i, dtype=np.int64))
        start, end = np.concatenate(starts), np.concatenate(ends)
        win, owner = np.concatenate(wins), np.concatenate(owners)
        cell = self._cell(start[:, 0], start[:, 1])

        self._cells.clear()
        self._window_kde.clear()
        self._all_kde = _scott_kde(end, owner)
        for w in np.unique(win):
            in_w = win == w
            self._window_kde[int(w)] = _scott_kde(end[in_w], owner[in_w])
            cw = cell[in_w]
            counts = np.bincount(cw, minlength=self.rows * self.cols)
            for c in np.flatnonzero(counts > self.lam):
                sel = np.flatnonzero(in_w)[cw == c]
                self._cells[(int(w), int(c))] = _scott_kde(end[sel], owner[sel])

        # Training -log densities, each video's moves scored with its own
        # points left out (leave-one-video-out) so the reference histogram
        # looks like what an unseen normal video produces.
        # Above ``reference_moves`` training moves, an evenly strided subset
        # of them makes the reference (bounds the fit cost on real-size sets).
        n_videos = len(cen)
        sub = np.arange(0, len(start), max(1, -(-len(start) // self.reference_moves)))
        start, end, win, cell, owner = start[sub], end[sub], win[sub], cell[sub], owner[sub]
        exclude = owner if n_videos > 1 else None
        nll = self._neg_log_density(start, end, win, cell, exclude)
        lo, hi = np.quantile(nll, self.bin_quantiles)
        if not hi > lo:
            hi = lo + 1.0
        self.edges = np.linspace(lo, hi, self.bins + 1)
        hists = np.stack([self._histogram(nll[owner == i]) for i in range(n_videos)])
        self.reference = hists.mean(axis=0)
        self.training_scores = np.array(
            [kl_divergence(h, self.reference, self.eps) for h in hists]
        )
        return self

    def _kde_for(self, w: int, c: int) -> _Kde:
        kde = self._cells.get((w, c))
        if kde is not None:
            return kde
        # Fallback for cells with <= lambda moves: the window's global KDE.
        kde = self._window_kde.get(w)
        return kde if kde is not None else self._all_kde  # type: ignore[return-value]

    def _neg_log_density(
        self,
        start: np.ndarray,
        end: np.ndarray,
        win: np.ndarray,
        cell: np.ndarray,
        exclude: np.ndarray | None,
    ) -> np.ndarray:
        """Batched form of ``score_move`` over many moves, grouped by KDE."""
        out = np.empty(len(start))
        key = win * (self.rows * self.cols) + cell
        order = np.argsort(key, kind="stable")
        uniq, first = np.unique(key[order], return_index=True)
        bounds = np.append(first, len(order))
        for k, u in enumerate(uniq):
            idx = order[bounds[k] : bounds[k + 1]]
            w, c = divmod(int(u), self.rows * self.cols)
            kde = self._kde_for(w, c)
            ex = None if exclude is None else exclude[idx]
            logd = _kde_log_density(kde, end[idx], ex)
            if ex is not None:
                # A cell fed only by this video: fall back to the window, then to all.
                bad = ~np.isfinite(logd)
                for fb in (self._window_kde.get(w), self._all_kde):
                    if bad.any() and fb is not None and fb is not kde:
                        logd[bad] = _kde_log_density(fb, end[idx][bad], ex[bad])
                        bad = ~np.isfinite(logd)
            out[idx] = -logd
        return out

    def _histogram(self, nll: np.ndarray) -> np.ndarray:
        assert self.edges is not None
        # Values beyond the learned range count in the end bins.
        v = np.clip(nll, self.edges[0], self.edges[-1])
        h = np.histogram(v, bins=self.edges)[0].astype(np.float64)
        return h / max(h.sum(), 1.0)

    # -- scoring

    def _require_fit(self) -> None:
        if self.reference is None:
            raise KdeAmdError("KdeAmd used before fit()")

    def score_move(self, x0: float, y0: float, x1: float, y1: float, window: int) -> float:
        """-log density (nats, px^-2 units) of one move from (x0, y0) to (x1, y1).

        Coordinates are *centred* positions (px). This is one frame's work of the
        method: find the start cell's KDE and sum its Gaussian kernels over all of
        that cell's training points.
        """
        self._require_fit()
        c = int(self._cell(np.asarray(x0, dtype=np.float64), np.asarray(y0, dtype=np.float64)))
        kde = self._kde_for(int(window), c)
        qw = np.array([x1, y1]) @ kde.w
        d = kde.white - qw
        e = -0.5 * np.einsum("ij,ij->i", d, d)
        m = e.max()
        return -float(np.log(np.exp(e - m).sum()) + m + kde.log_norm - np.log(kde.n))

    def move_scores(self, positions: np.ndarray, obstacles: np.ndarray) -> np.ndarray:
        """-log density of every move of a video (raw positions; centred here)."""
        self._require_fit()
        p = self._check(positions, obstacles, "test video")
        s, e, w = self._moves(p, obstacles)
        return self._neg_log_density(s, e, w, self._cell(s[:, 0], s[:, 1]), None)

    def score(self, positions: np.ndarray, obstacles: np.ndarray) -> float:
        """A video's anomaly score: KL(histogram of its move -log densities || reference)."""
        h = self._histogram(self.move_scores(positions, obstacles))
        assert self.reference is not None  # move_scores checked fit
        return kl_divergence(h, self.reference, self.eps)

    def cell_sizes(self) -> np.ndarray:
        """Number of training points behind each fitted (window, cell) KDE."""
        return np.array([k.n for k in self._cells.values()], dtype=np.int64)


# --------------------------------------------------------------- protocol














def measure_frame_cost(
    model: KdeAmd, positions: np.ndarray, obstacles: np.ndarray, max_moves: int = 5000
) -> dict[str, float]:
    """Time ``score_move`` on a video's moves (µs per frame: median, p99).

    Also reports the median number of training points summed per frame
    (``points_median``), which is what the cost scales with.
    """
    p = model._check(positions, obstacles, "timed video")
    s, e, w = KdeAmd._moves(p, obstacles)
    k = min(len(s), max_moves)
    times = np.empty(k)
    npts = np.empty(k)
    clock = time.perf_counter_ns
    for i in range(k):
        t = clock()
        model.score_move(s[i, 0], s[i, 1], e[i, 0], e[i, 1], int(w[i]))
        times[i] = clock() - t
        npts[i] = model._kde_for(int(w[i]), int(model._cell(s[i, 0], s[i, 1]))).n
    us = times / 1000.0
    return {
        "median_us": float(np.median(us)),
        "p99_us": float(np.quantile(us, 0.99)),
        "points_median": float(np.median(npts)),
        "frames": float(k),
    }
