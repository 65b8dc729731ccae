"""Small statistics shared by evaluation, benchmarks and the view: ROC, percentiles, Poisson."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def roc_auc(scores_neg: Sequence[float] | np.ndarray, scores_pos: Sequence[float] | np.ndarray
            ) -> float:
    """ROC AUC = P(pos score > neg score) + 0.5 P(tie), by ranks (Mann-Whitney U).

    ``scores_neg`` are the normal items, ``scores_pos`` the anomalous ones;
    higher score = more anomalous. Returns NaN when either side is empty.
    """
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    sv = allv[order]
    ranks = np.empty(allv.size)
    # Average rank over ties (1-based).
    _, first, counts = np.unique(sv, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def _poisson_cdf(k: int, lam: float) -> float:
    """P(Poisson(lam) <= k)."""
    term = math.exp(-lam)
    total = term
    for i in range(1, k + 1):
        term *= lam / i
        total += term
    return total


def _bisect_decreasing(f, target: float, lo: float, hi: float) -> tuple[float, float]:
    """Bracket of the x where the decreasing f(x) crosses `target`, to float precision."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def poisson_upper(k: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a Poisson mean after observing `k` events."""
    return _bisect_decreasing(lambda lam: _poisson_cdf(k, lam), 1.0 - confidence, float(k),
                              float(k) + 10.0 * math.sqrt(k + 1) + 10.0)[1]


def gamma_lower(n: int, confidence: float = 0.95) -> float:
    """The (1 - confidence) quantile of a Gamma(n, 1) sum of `n` unit exponentials: an
    exponential mean estimated as S / n is below S / gamma_lower(n) with `confidence`."""
    if n < 1:
        raise ValueError("gamma_lower needs n >= 1")
    # P(Gamma(n) > x) = P(Poisson(x) <= n - 1)
    return _bisect_decreasing(lambda x: _poisson_cdf(n - 1, x), confidence, 0.0, float(n))[0]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_upper(p: float, dof: float) -> float:
    """The t with P(T > t) = p (0 < p <= 0.5) for Student's t with `dof` degrees of freedom."""
    if not 0.0 < p <= 0.5 or dof <= 0:
        raise ValueError("student_t_upper needs 0 < p <= 0.5 and dof > 0")
    tail = lambda t: 0.5 * _betainc(0.5 * dof, 0.5, dof / (dof + t * t))  # noqa: E731
    return _bisect_decreasing(tail, p, 0.0, 1e7)[1]


def prediction_upper(values: Sequence[float] | np.ndarray, p: float) -> float:
    """Level a new draw from the population that gave `values` exceeds with probability
    `p`: the normal prediction bound mean + t(p, n - 1) sd sqrt(1 + 1/n); inf for n < 2."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return math.inf
    sd = float(v.std(ddof=1))
    return float(v.mean()) + student_t_upper(p, n - 1) * sd * math.sqrt(1.0 + 1.0 / n)


def roc_curve(neg: Sequence[float], pos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0,0) to (1,1)."""
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    thr = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.array([0.0] + [float((neg >= t).mean()) if len(neg) else 0.0 for t in thr])
    tpr = np.array([0.0] + [float((pos >= t).mean()) if len(pos) else 0.0 for t in thr])
    return fpr, tpr


def percentiles(values: np.ndarray, qs: Sequence[tuple[str, float]],
                top: float | None = None) -> dict[str, float | None]:
    """Named percentiles of ``values`` (``qs``: (name, q in %) pairs) and ``max``, in the
    values' unit, rounded to 0.1; all None when ``values`` is empty.

    Linear between ranks, numpy's default method, by a sort and the interpolation by hand:
    np.percentile costs ~25 µs per call on a few hundred values, this a few (the monitor
    calls it in the gap between two frames). ``top``: the exact maximum when ``values``
    may no longer hold it (a ring that wrapped around).
    """
    ranked = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = ranked.shape[0]
    if n == 0:
        return {**{name: None for name, _ in qs}, "max": None}
    out: dict[str, float | None] = {}
    for name, q in qs:
        pos = q / 100.0 * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        out[name] = round(float(ranked[lo] + (ranked[hi] - ranked[lo]) * (pos - lo)), 1)
    out["max"] = round(float(ranked[-1] if top is None else top), 1)
    return out
