"""KDE-AMD as the published code computes it: the default baseline.

The code behind the published AUC of 0.978 (Atienza et al.; DESIGN section 3)
does several things the paper does not say, and they change its numbers: a
fixed 35 x 35 grid over a 0..32 px square, a lookup that reads that grid
transposed, a time window that is never scored, additive smoothing, and a
summary KDE on a grid spanning every video of the type. This module does all of
it, in our own code; `lhtstream.model.kdeamd` keeps the paper's description
(with our improvements) as the second baseline. docs/kdeamd.md lists each
behaviour next to the choice made here. The Gaussian KDEs are computed as
``scipy.stats.gaussian_kde`` computes them (Scott's rule, full covariance,
Cholesky-whitened kernels); scipy itself is not needed.

Per type, leave-one-out (`leave_one_out`): for each video, fit on the others
(`PublishedKdeAmd.fit`), give every move of the held-out video, clean and with
the published position noise, its smoothed probability
(`PublishedKdeAmd.move_probabilities`); then summarise each video's -log p
series as a KDE on one 2000-point grid and score it by KL(mean of the other
videos' clean curves || its curve) (`summary_scores`).

Units: positions in pixels (x = column, y = row); after `centre_published` they
live on the 0..32 px square with each video's mean at (16, 16). Time in frames.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from numba import njit

from lhtstream.model.kdeamd import KdeAmdError, centres_of_mass

__all__ = [
    "CELLS",
    "LAMBDA",
    "PublishedKdeAmd",
    "add_published_noise",
    "centre_published",
    "kl_published",
    "leave_one_out",
    "measure_frame_cost",
    "published_noise",
    "published_positions",
    "scoring_windows",
    "summary_curve",
    "summary_scores",
    "window_bounds",
]

#: Grid cells per axis over the square and the minimum moves a cell needs for a KDE
#: (more than LAMBDA): the published best setting for 0.978.
CELLS = 35
LAMBDA = 15
#: The fixed square the grid covers (px) and where each video's mean is moved to.
SQUARE_PX = 32.0
CENTRE_PX = 16.0
#: Noisy positions are clipped to [0, NOISE_CLIP_PX] when any leaves the square.
NOISE_CLIP_PX = 31.99
#: Additive smoothing of a move's probability: p + (SMOOTHING + p) / (1 + SMOOTHING).
SMOOTHING = 1e-6
#: Points of the grid on which each video's -log p summary KDE is evaluated.
SUMMARY_POINTS = 2000


# --------------------------------------------------------------- positions


def published_positions(video: np.ndarray) -> np.ndarray:
    """`centres_of_mass` of every difference frame, blank frames filled as published.

    ``video`` is ``(frames, rows, cols)``; returns ``(frames, 2)`` float64 ``(x, y)``
    px. An all-zero frame takes the previous frame's position; blank frames at the
    start take the *last* non-blank frame's position (the published fill steps back
    cyclically from index 0 to -1).
    """
    xy, present = centres_of_mass(video)
    source = np.where(present, np.arange(len(present)), -1)
    np.maximum.accumulate(source, out=source)
    source[source < 0] = np.flatnonzero(present)[-1]
    return xy[source]


def centre_published(positions: np.ndarray, where: str = "video") -> np.ndarray:
    """Shift ``(n, 2)`` positions (px) so their mean is (16, 16); they must stay in 0..32."""
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
        raise KdeAmdError(f"{where}: positions must be (frames >= 2, 2), got {p.shape}")
    if not np.isfinite(p).all():
        raise KdeAmdError(f"{where}: positions contain NaN or inf")
    c = p - p.mean(axis=0) + CENTRE_PX
    if c.min() < 0.0 or c.max() > SQUARE_PX:
        raise KdeAmdError(
            f"{where}: centred at (16, 16) its positions span {c.min():.2f}..{c.max():.2f} px, "
            f"outside the published 0..32 px square")
    return c


def published_noise(frames: int, sigma: float, seed: int = 0) -> np.ndarray:
    """The published protocol noise: ``(frames, 2)`` px, N(0, sigma^2) on x then on y.

    Drawn from numpy's legacy generator seeded with ``seed`` for every video, so every
    video of the same length gets the same noise sequence (as published, seed 0).
    """
    rs = np.random.RandomState(int(seed))
    nx = rs.normal(0.0, sigma, int(frames))
    ny = rs.normal(0.0, sigma, int(frames))
    return np.column_stack([nx, ny])


def add_published_noise(centred: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Centred positions plus `published_noise`; when any leaves the 0..32 square,
    all are clipped to [0, 31.99] px as published."""
    q = centred + published_noise(len(centred), sigma, seed)
    if q.min() < 0.0 or q.max() > SQUARE_PX:
        q = np.clip(q, 0.0, NOISE_CLIP_PX)
    return q


# --------------------------------------------------------------- windows and cells


def window_bounds(obstacles: np.ndarray) -> np.ndarray:
    """``[0, ini1, end1, (ini2, end2,) frames]`` from per-frame obstacle states 0/1/2.

    ``ini``/``end`` are the first and last frame of each obstacle window (the data
    set's ``KeyfIniObstacleN`` / ``KeyfEndObstacleN``); window w runs from bound w to
    bound w + 1 (exclusive), so no obstacle is one window, each obstacle adds two.
    """
    o = np.asarray(obstacles)
    bounds = [0]
    for state in (1, 2):
        idx = np.flatnonzero(o == state)
        if idx.size:
            bounds += [int(idx[0]), int(idx[-1])]
    bounds.append(int(o.shape[0]))
    return np.asarray(bounds, dtype=np.int64)


def scoring_windows(obstacles: np.ndarray) -> np.ndarray:
    """``(frames - 1,)`` window whose KDEs score move t -> t+1; -1 where none does.

    As published, by the move's start frame and the video's own key frames; the
    window just before the last one (with one obstacle: the obstacle window) is never
    scored, its moves keep probability 0 before smoothing.
    """
    b = window_bounds(obstacles)
    n = int(b[-1])
    last = len(b) - 2
    win = np.full(max(n - 1, 0), -1, dtype=np.int64)
    for w in range(last - 1):
        win[b[w]:b[w + 1]] = w
    win[b[last]:n - 1] = last
    return win


def _edges(cells: int) -> np.ndarray:
    """Cell edges along each axis of the 0..32 px square, as published."""
    return np.linspace(0.0, SQUARE_PX, cells + 1)


def _cells(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Cell index along one axis (``digitize(v, edges) - 1``); -1 outside [0, 32)."""
    i = np.searchsorted(edges, v, side="right") - 1
    return np.where((v >= 0.0) & (v < edges[-1]), i, -1).astype(np.int64)


# --------------------------------------------------------------- kernels


@njit(cache=True)
def _fit_cells(keys, ends, lam, n_keys):  # pragma: no cover - compiled
    """Per sorted key (window, row, col): a Scott's-rule 2-D Gaussian KDE of ``ends``.

    Returns start/count into the key-sorted points (count 0: no KDE, i.e. at most
    ``lam`` moves or a covariance that is not positive definite), the points
    whitened by the bandwidth's Cholesky factor L, L as (l00, l10, l11), and the
    kernel normalisation 1 / (2 pi l00 l11).
    """
    start = np.zeros(n_keys, np.int64)
    count = np.zeros(n_keys, np.int64)
    chol = np.zeros((n_keys, 3))
    norm = np.zeros(n_keys)
    white = np.zeros_like(ends)
    m = keys.shape[0]
    i = 0
    while i < m:
        k = keys[i]
        j = i
        while j < m and keys[j] == k:
            j += 1
        n = j - i
        if n > lam:
            mx = 0.0
            my = 0.0
            for t in range(i, j):
                mx += ends[t, 0]
                my += ends[t, 1]
            mx /= n
            my /= n
            sxx = 0.0
            sxy = 0.0
            syy = 0.0
            for t in range(i, j):
                dx = ends[t, 0] - mx
                dy = ends[t, 1] - my
                sxx += dx * dx
                sxy += dx * dy
                syy += dy * dy
            a = sxx / (n - 1)
            if a > 0.0:
                l00 = math.sqrt(a)
                l10 = sxy / (n - 1) / l00
                schur = syy / (n - 1) - l10 * l10
                if schur > 0.0:
                    factor = n ** (-1.0 / 6.0)  # Scott: n^(-1/(d+4)), d = 2
                    l00 *= factor
                    l10 *= factor
                    l11 = math.sqrt(schur) * factor
                    start[k] = i
                    count[k] = n
                    chol[k, 0] = l00
                    chol[k, 1] = l10
                    chol[k, 2] = l11
                    norm[k] = 1.0 / (2.0 * math.pi) / l00 / l11
                    for t in range(i, j):
                        z0 = ends[t, 0] / l00
                        white[t, 0] = z0
                        white[t, 1] = (ends[t, 1] - l10 * z0) / l11
        i = j
    return start, count, white, chol, norm


@njit(cache=True)
def _density(k, x, y, start, count, white, chol, norm):  # pragma: no cover - compiled
    """KDE k's density (1/px^2) at (x, y): the mean of its whitened Gaussian kernels."""
    z0 = x / chol[k, 0]
    z1 = (y - chol[k, 1] * z0) / chol[k, 2]
    n = count[k]
    w = 1.0 / n
    c = norm[k]
    acc = 0.0
    for t in range(start[k], start[k] + n):
        d0 = white[t, 0] - z0
        d1 = white[t, 1] - z1
        acc += w * (math.exp(-(d0 * d0 + d1 * d1) / 2.0) * c)
    return acc


@njit(cache=True)
def _cell(v, edges):  # pragma: no cover - compiled
    """`_cells` of one value."""
    if not (v >= 0.0 and v < edges[-1]):
        return -1
    return np.searchsorted(edges, v, side="right") - 1


@njit(cache=True)
def _move_probability(w, x0, y0, x1, y1, edges, start, count, white, chol,
                      norm):  # pragma: no cover - compiled
    """Smoothed probability of one move, the published way: its start cell (col, row) is
    looked up as [window][col][row] in a table fitted as [window][row][col]."""
    cells = edges.shape[0] - 1
    col = _cell(x0, edges)
    row = _cell(y0, edges)
    p = 0.0
    if w >= 0 and col >= 0 and row >= 0:
        k = (w * cells + col) * cells + row
        if count[k] > 0:
            p = _density(k, x1, y1, start, count, white, chol, norm)
    return p + (SMOOTHING + p) / (1.0 + SMOOTHING)


@njit(cache=True)
def _move_probabilities(pos, win, edges, start, count, white, chol, norm,
                        out):  # pragma: no cover - compiled
    for t in range(pos.shape[0] - 1):
        out[t] = _move_probability(win[t], pos[t, 0], pos[t, 1], pos[t + 1, 0], pos[t + 1, 1],
                                   edges, start, count, white, chol, norm)


@njit(cache=True)
def _summary_curve(values, counts, n, h, grid):  # pragma: no cover - compiled
    """1-D Gaussian KDE (bandwidth h) of ``values`` repeated ``counts`` times, on ``grid``."""
    out = np.zeros(grid.shape[0])
    c = 1.0 / math.sqrt(2.0 * math.pi) / h / n
    for i in range(values.shape[0]):
        v = values[i] / h
        wi = counts[i] * c
        for j in range(grid.shape[0]):
            d = v - grid[j] / h
            out[j] += wi * math.exp(-d * d / 2.0)
    return out


# --------------------------------------------------------------- the model


class PublishedKdeAmd:
    """One fold of published KDE-AMD: per (window, cell) KDEs of the next position.

    ``fit`` takes the training videos' *centred* positions (`centre_published`) and
    obstacle states; ``move_probabilities`` gives a video's smoothed move
    probabilities; ``score_move`` is one frame's work, for timing.
    """

    def __init__(self, cells: int = CELLS, lam: int = LAMBDA) -> None:
        if not 1 <= int(cells) <= 1000 or int(lam) < 1:
            raise KdeAmdError(f"cells must be 1..1000 and lambda >= 1, got {cells}, {lam}")
        self.cells, self.lam = int(cells), int(lam)
        self.edges = _edges(self.cells)
        self.windows = 0
        self._tables: tuple[np.ndarray, ...] | None = None

    def fit(self, positions: Sequence[np.ndarray], obstacles: Sequence[np.ndarray]
            ) -> PublishedKdeAmd:
        """Fit on centred ``(n, 2)`` positions (px) and ``(n,)`` obstacle states 0/1/2.

        Window w of the type starts at the earliest bound w over the training videos
        and ends at the latest bound w + 1; a video's moves belong to the window that
        holds their end frame, and the move into a window counts only when the
        window starts before that video's own bound (as the published crops do).
        """
        if len(positions) == 0 or len(positions) != len(obstacles):
            raise KdeAmdError(f"fit needs >= 1 training video with obstacle states "
                              f"({len(positions)} position series, {len(obstacles)} state "
                              f"series)")
        bounds = [self._bounds(p, o, f"training video {i}")
                  for i, (p, o) in enumerate(zip(positions, obstacles, strict=True))]
        sizes = {len(b) for b in bounds}
        if len(sizes) != 1:
            raise KdeAmdError(f"training videos have different numbers of obstacle windows "
                              f"({sorted(s - 2 for s in sizes)} key-frame pairs): one type's "
                              f"videos share one window layout")
        self.windows = len(bounds[0]) - 1
        low = np.min(np.stack(bounds), axis=0)
        keys, ends = [], []
        for p, b in zip(positions, bounds, strict=True):
            pos = np.asarray(p, dtype=np.float64)
            dest = np.arange(1, len(pos))
            w = np.searchsorted(b[1:-1], dest, side="right")
            first = dest == b[w]
            row, col = _cells(pos[:-1, 1], self.edges), _cells(pos[:-1, 0], self.edges)
            keep = (row >= 0) & (col >= 0) & (~first | (b[w] > low[w]))
            keys.append(((w * self.cells + row) * self.cells + col)[keep])
            ends.append(pos[1:][keep])
        key = np.concatenate(keys)
        order = np.argsort(key, kind="stable")  # video, then frame order within a cell
        self._tables = _fit_cells(key[order], np.ascontiguousarray(np.concatenate(ends)[order]),
                                  self.lam, self.windows * self.cells * self.cells)
        return self

    def _bounds(self, positions: np.ndarray, obstacles: np.ndarray, where: str) -> np.ndarray:
        p = np.asarray(positions)
        o = np.asarray(obstacles)
        if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2 or o.shape != (p.shape[0],):
            raise KdeAmdError(f"{where}: positions {p.shape} and obstacle states {o.shape} "
                              f"must be (frames >= 2, 2) and (frames,)")
        return window_bounds(o)

    def _require_fit(self) -> tuple[np.ndarray, ...]:
        if self._tables is None:
            raise KdeAmdError("PublishedKdeAmd used before fit()")
        return self._tables

    def move_probabilities(self, positions: np.ndarray, obstacles: np.ndarray) -> np.ndarray:
        """``(frames - 1,)`` smoothed probability of each move t -> t+1 of a centred video."""
        tables = self._require_fit()
        b = self._bounds(positions, obstacles, "scored video")
        if len(b) - 1 != self.windows:
            raise KdeAmdError(f"scored video has {len(b) - 1} time windows, the model "
                              f"{self.windows}")
        pos = np.ascontiguousarray(positions, dtype=np.float64)
        out = np.empty(len(pos) - 1)
        _move_probabilities(pos, scoring_windows(obstacles), self.edges, *tables,  # type: ignore[call-arg]
                            out)
        return out

    def score_move(self, x0: float, y0: float, x1: float, y1: float, window: int) -> float:
        """Smoothed probability of one move from (x0, y0) to (x1, y1), centred px, scored
        by `window` (from `scoring_windows`; -1: not scored). One frame of the method."""
        return _move_probability(window, x0, y0, x1, y1, self.edges, *self._require_fit())

    def lookup_points(self, x0: float, y0: float, window: int) -> int:
        """Training points of the KDE a move from (x0, y0) in `window` is scored with (the
        transposed lookup); 0 when it finds none. What one frame's cost scales with."""
        count = self._require_fit()[1]
        col, row = _cell(float(x0), self.edges), _cell(float(y0), self.edges)
        if window < 0 or col < 0 or row < 0:
            return 0
        return int(count[(int(window) * self.cells + col) * self.cells + row])

    def cell_sizes(self) -> np.ndarray:
        """Training points behind each fitted (window, cell) KDE."""
        count = self._require_fit()[1]
        return count[count > 0].copy()


def measure_frame_cost(model: PublishedKdeAmd, centred: np.ndarray, obstacles: np.ndarray,
                       max_moves: int = 5000) -> dict[str, float]:
    """Time `PublishedKdeAmd.score_move` on a centred video's moves (µs per frame).

    Returns the median, mean and p99 over up to ``max_moves`` frames, the fraction of
    frames whose lookup finds a KDE (``hit_fraction``; the others cost only the lookup),
    the median cost of those (``hit_median_us``) and the median training points summed
    on them (``points_median``).
    """
    pos = np.asarray(centred, dtype=np.float64)
    win = scoring_windows(obstacles)
    k = min(len(win), int(max_moves))
    if k < 1:
        raise KdeAmdError("measure_frame_cost needs a video of >= 2 frames")
    ns = np.empty(k)
    points = np.array([model.lookup_points(pos[i, 0], pos[i, 1], int(win[i])) for i in range(k)])
    clock = time.perf_counter_ns
    score = model.score_move
    for i in range(k):
        t = clock()
        score(pos[i, 0], pos[i, 1], pos[i + 1, 0], pos[i + 1, 1], int(win[i]))
        ns[i] = clock() - t
    us = ns / 1000.0
    hit = points > 0
    return {"median_us": float(np.median(us)), "mean_us": float(us.mean()),
            "p99_us": float(np.quantile(us, 0.99)), "frames": float(k),
            "hit_fraction": float(hit.mean()),
            "hit_median_us": float(np.median(us[hit])) if hit.any() else 0.0,
            "points_median": float(np.median(points[hit])) if hit.any() else 0.0}


# --------------------------------------------------------------- video scores


def summary_curve(nll: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A video's -log p values as a 1-D Gaussian KDE (Scott's rule) on ``grid``."""
    v = np.asarray(nll, dtype=np.float64)
    n = v.shape[0]
    var = float(v.var(ddof=1)) if n > 1 else 0.0
    if not var > 0.0 or not math.isfinite(var):
        raise KdeAmdError(f"all {n} moves have the same probability: a summary KDE needs "
                          f"spread")
    h = math.sqrt(var) * n ** (-0.2)
    values, counts = np.unique(v, return_counts=True)  # many moves share p = 0
    return _summary_curve(values, counts.astype(np.float64), float(n), h,
                          np.asarray(grid, dtype=np.float64))


def kl_published(reference: np.ndarray, curve: np.ndarray) -> float:
    """KL(reference || curve), nats, both normalised to sum 1 (``scipy.stats.entropy``):
    infinite where the curve is 0 and the reference is not."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(curve, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, np.where(q > 0.0, p * np.log(p / q), np.inf), 0.0)
    return float(terms.sum())


def summary_scores(clean: Sequence[np.ndarray], noisy: Sequence[np.ndarray],
                   names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each video's clean and noisy score from its move -log p series (one type).

    The curves are evaluated on `SUMMARY_POINTS` points from the smallest to the
    largest -log p of all the series, clean and noisy; video n's reference is the
    mean of the other videos' clean curves.
    """
    if len(clean) < 2 or len(noisy) != len(clean):
        raise KdeAmdError(f"summary scores need >= 2 videos, each clean and noisy "
                          f"({len(clean)} clean, {len(noisy)} noisy)")
    names = list(names) if names is not None else [str(i) for i in range(len(clean))]
    lo = min(float(np.min(a)) for a in (*clean, *noisy))
    hi = max(float(np.max(a)) for a in (*clean, *noisy))
    grid = np.linspace(lo, hi, SUMMARY_POINTS)

    def curve(a: np.ndarray, name: str, what: str) -> np.ndarray:
        try:
            return summary_curve(a, grid)
        except KdeAmdError as e:
            raise KdeAmdError(f"video {name} ({what}): {e}") from None

    d = np.stack([curve(a, n, "clean") for a, n in zip(clean, names, strict=True)])
    g = np.stack([curve(a, n, "noisy") for a, n in zip(noisy, names, strict=True)])
    ref = [np.delete(d, i, axis=0).mean(axis=0) for i in range(len(d))]
    return (np.array([kl_published(r, c) for r, c in zip(ref, d, strict=True)]),
            np.array([kl_published(r, c) for r, c in zip(ref, g, strict=True)]))


def leave_one_out(positions: Sequence[np.ndarray], obstacles: Sequence[np.ndarray],
                  variances: Sequence[float], *, seed: int = 0, cells: int = CELLS,
                  lam: int = LAMBDA, names: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None
                  ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """The published evaluation of one type: ``{variance: (clean scores, noisy scores)}``.

    ``positions`` are each video's raw `published_positions` (px); every video is held
    out once, the model fitted on the others, and scored clean and with
    `add_published_noise` of each variance (px^2). Clean scores depend on the variance
    too: the summary grid spans the noisy series.
    """
    names = list(names) if names is not None else [f"{i:04d}" for i in range(len(positions))]
    if len(positions) < 2 or len(obstacles) != len(positions) or len(names) != len(positions):
        raise KdeAmdError(f"leave-one-out needs >= 2 videos with obstacle states and names "
                          f"({len(positions)} position series, {len(obstacles)} state series)")
    centred = [centre_published(p, f"video {n}") for p, n in zip(positions, names, strict=True)]
    levels = [float(v) for v in variances]
    clean: list[np.ndarray] = []
    noisy: dict[float, list[np.ndarray]] = {v: [] for v in levels}
    for i in range(len(centred)):
        model = PublishedKdeAmd(cells, lam).fit(centred[:i] + centred[i + 1:],
                                                list(obstacles[:i]) + list(obstacles[i + 1:]))
        clean.append(-np.log(model.move_probabilities(centred[i], obstacles[i])))
        for v in levels:
            q = add_published_noise(centred[i], math.sqrt(v), seed)
            noisy[v].append(-np.log(model.move_probabilities(q, obstacles[i])))
        if progress is not None:
            progress(f"fold {i + 1}/{len(centred)}")
    return {v: summary_scores(clean, noisy[v], names) for v in levels}
