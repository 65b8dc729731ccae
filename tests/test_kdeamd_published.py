"""KDE-AMD as published: hand-worked cases where its quirks decide the numbers.

Each expected value below is derived in the comments (cells, counts, covariances),
not taken from the implementation. docs/kdeamd.md lists the behaviours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lhtstream.model.kdeamd import KdeAmdError
from lhtstream.model.kdeamd_published import (
    SMOOTHING,
    PublishedKdeAmd,
    add_published_noise,
    centre_published,
    kl_published,
    leave_one_out,
    published_noise,
    published_positions,
    scoring_windows,
    summary_curve,
    summary_scores,
    window_bounds,
)

#: A move whose probability is 0 before smoothing: 0 + (1e-6 + 0) / 1.000001.
SMOOTHED_ZERO = 1e-6 / 1.000001


def _kde2(points: np.ndarray, q: np.ndarray) -> float:
    """Scott's-rule 2-D Gaussian KDE density at q, written out: H = cov * n^(-1/3)."""
    n = len(points)
    c = np.cov(points.T) * n ** (-1.0 / 3.0)
    hinv = np.linalg.inv(c)
    d = q - points
    m = np.einsum("ij,jk,ik->i", d, hinv, d)
    return float(np.exp(-m / 2).sum() / n / (2 * math.pi * math.sqrt(np.linalg.det(c))))


# ------------------------------------------------------------ the transposed lookup


def test_transposed_lookup_hits_an_empty_cell_and_smoothing_doubles_a_hit() -> None:
    # 2 x 2 cells over the 0..32 square: cell index 0 below 16 px, 1 from 16 px.
    # A = (row 0, col 1): x >= 16, y < 16.  B = (row 1, col 0): x < 16, y >= 16.
    train = np.array([[20, 4], [4, 20], [21, 5], [5, 22], [22, 4], [4, 21]], dtype=float)
    # moves from A: 0->1, 2->3, 4->5 (3 > lambda = 2): a KDE at [row 0][col 1] of the
    # ends E = (4, 20), (5, 22), (4, 21). Moves from B: 1->2, 3->4 (2): no KDE.
    model = PublishedKdeAmd(cells=2, lam=2).fit([train], [np.zeros(6)])
    np.testing.assert_array_equal(model.cell_sizes(), [3])

    video = np.array([[20, 5], [4.5, 21], [4.4, 21.2]])
    p = model.move_probabilities(video, np.zeros(3))
    # Move 0 starts in A (col 1, row 0), looked up as [col][row] = [1][0]: B's empty
    # slot, so p = 0 although A has a KDE; the smoothing makes it 1e-6 / 1.000001.
    assert p[0] == SMOOTHED_ZERO
    # Move 1 starts in B (col 0, row 1), looked up as [0][1]: A's KDE, at (4.4, 21.2).
    # By hand: mean(E) = (13/3, 21), cov = [[1/3, 1/2], [1/2, 1]], det 1/12,
    # cov^-1 = [[12, -6], [-6, 4]]; H = cov * 3^(-1/3).  q - E = (0.4, 1.2),
    # (-0.6, -0.8), (0.4, 0.2) give v'cov^-1 v = 1.92, 1.12, 1.12.
    k = 3 ** (1 / 3)
    density = (math.exp(-1.92 * k / 2) + 2 * math.exp(-1.12 * k / 2)) / 3 / (
        2 * math.pi * math.sqrt(3 ** (-2 / 3) / 12))
    assert density == pytest.approx(0.3028, abs=5e-4)
    # smoothing: p + (1e-6 + p) / 1.000001, about twice the density
    assert p[1] == pytest.approx(density + (1e-6 + density) / 1.000001, rel=1e-12)
    assert model.score_move(4.5, 21.0, 4.4, 21.2, 0) == p[1]
    assert model.score_move(20.0, 5.0, 4.5, 21.0, 0) == SMOOTHED_ZERO


def test_outside_the_square_has_no_cell() -> None:
    train = np.array([[20, 4], [4, 20], [21, 5], [5, 22], [22, 4], [4, 21]], dtype=float)
    model = PublishedKdeAmd(cells=2, lam=2).fit([train], [np.zeros(6)])
    assert model.score_move(4.5, 32.0, 4.4, 21.2, 0) == SMOOTHED_ZERO
    assert model.score_move(-0.1, 21.0, 4.4, 21.2, 0) == SMOOTHED_ZERO
    assert model.score_move(4.5, 21.0, 4.4, 21.2, -1) == SMOOTHED_ZERO  # unscored window


# ------------------------------------------------------------ windows


def _states(n: int, first: int, last: int) -> np.ndarray:
    o = np.zeros(n, dtype=np.int8)
    o[first:last + 1] = 1
    return o


def test_window_bounds_and_the_window_never_scored() -> None:
    o = _states(16, 5, 10)
    np.testing.assert_array_equal(window_bounds(o), [0, 5, 10, 16])
    two = np.zeros(30, dtype=np.int8)
    two[4:8], two[15:20] = 1, 2
    np.testing.assert_array_equal(window_bounds(two), [0, 4, 7, 15, 19, 30])
    np.testing.assert_array_equal(window_bounds(np.zeros(9)), [0, 9])
    # one obstacle: window 0 scores moves starting at frames 0..4, window 1 (the
    # obstacle, frames 5..9) is skipped, the last window scores 10..14 (no move from 15)
    np.testing.assert_array_equal(scoring_windows(o), [0] * 5 + [-1] * 5 + [2] * 5)
    # two obstacles (5 windows): 0, 1, 2 scored, 3 (the second obstacle) skipped, 4 last
    w = scoring_windows(two)
    assert list(np.unique(w)) == [-1, 0, 1, 2, 4]
    assert (w[15:19] == -1).all() and (w[19:] == 4).all() and (w[7:15] == 2).all()
    np.testing.assert_array_equal(scoring_windows(np.zeros(5)), [0, 0, 0, 0])


def test_training_windows_span_the_videos_and_the_obstacle_window_is_skipped() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(8, 24, (16, 2))
    b = rng.uniform(8, 24, (16, 2))
    oa, ob = _states(16, 5, 10), _states(16, 6, 11)  # bounds [0 5 10 16], [0 6 11 16]
    model = PublishedKdeAmd(cells=1, lam=2).fit([a, b], [oa, ob])
    # A move belongs to the window of its end frame. Window w starts at the earliest
    # bound over the videos (0, 5, 10), so a video's move *into* a window counts only
    # if its own bound is later than that:
    #   window 0: a t=0..3 (4), b t=0..4 (5)                              -> 9
    #   window 1: a t=5..8 (t=4 dropped: bound 5 = earliest), b t=5..9 (5) -> 9
    #   window 2: a t=10..14 (t=9 dropped), b t=10..14 (t=10 kept: 11 > 10) -> 10
    np.testing.assert_array_equal(model.cell_sizes(), [9, 9, 10])

    p = model.move_probabilities(a, oa)
    # frames 5..9 of a start in its obstacle window: never scored, whatever its KDE
    assert (p[5:10] == SMOOTHED_ZERO).all()
    # move 4 -> 5 starts in window 0 and is scored by window 0's KDE (ends of a 0..3,
    # b 0..4), although it was not a window-0 training move
    ends0 = np.concatenate([a[1:5], b[1:6]])
    d = _kde2(ends0, a[5])
    assert p[4] == pytest.approx(d + (1e-6 + d) / 1.000001, rel=1e-10)
    ends2 = np.concatenate([a[11:16], b[11:16]])
    d = _kde2(ends2, a[13])
    assert p[12] == pytest.approx(d + (1e-6 + d) / 1.000001, rel=1e-10)


def test_layout_mismatch_and_misuse_are_clear_errors() -> None:
    p = np.full((16, 2), 16.0)
    with pytest.raises(KdeAmdError, match="different numbers of obstacle windows"):
        PublishedKdeAmd(cells=1).fit([p, p], [_states(16, 5, 10), np.zeros(16)])
    with pytest.raises(KdeAmdError, match="before fit"):
        PublishedKdeAmd().move_probabilities(p, np.zeros(16))
    model = PublishedKdeAmd(cells=1, lam=2).fit([p], [np.zeros(16)])
    with pytest.raises(KdeAmdError, match="3 time windows, the model 1"):
        model.move_probabilities(p, _states(16, 5, 10))
    with pytest.raises(KdeAmdError, match=r"obstacle states \(15,\)"):
        model.move_probabilities(p, np.zeros(15))
    with pytest.raises(KdeAmdError, match="cells"):
        PublishedKdeAmd(cells=0)


# ------------------------------------------------------------ positions and noise


def test_positions_fill_leading_blanks_from_the_end() -> None:
    v = np.zeros((5, 3, 4), dtype=np.uint16)
    v[2, 1, 3] = 50  # (x 3, y 1)
    v[3, 0, 0], v[3, 2, 2] = 10, 30  # x = (0 + 3 * 2) / 4 = 1.5, y = 1.5
    p = published_positions(v)
    np.testing.assert_allclose(p[2], [3.0, 1.0])
    np.testing.assert_allclose(p[3], [1.5, 1.5])
    np.testing.assert_allclose(p[4], [1.5, 1.5])  # blank: previous frame
    np.testing.assert_allclose(p[:2], [[1.5, 1.5]] * 2)  # leading blanks: the last spot
    with pytest.raises(KdeAmdError, match="no non-zero frame"):
        published_positions(np.zeros((3, 2, 2)))


def test_centring_on_the_fixed_square() -> None:
    c = centre_published(np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(c, [[15.0, 14.0], [17.0, 18.0]])
    with pytest.raises(KdeAmdError, match="outside the published 0..32 px square"):
        centre_published(np.array([[0.0, 0.0], [40.0, 0.0]]), "video 0007")
    with pytest.raises(KdeAmdError, match="NaN"):
        centre_published(np.array([[np.nan, 0.0], [1.0, 0.0]]))


def test_noise_is_the_same_sequence_for_every_video_and_clipped_as_published() -> None:
    n = published_noise(3, 0.5)
    # numpy's legacy generator seeded with 0: first standard normals 1.7641, 0.4002, 0.9787
    np.testing.assert_allclose(n[:, 0], 0.5 * np.array([1.76405235, 0.40015721, 0.97873798]))
    np.testing.assert_array_equal(published_noise(3, 0.5), n)  # re-seeded per video
    # y continues the same stream after the frames' x draws
    np.testing.assert_allclose(published_noise(1, 1.0), [[1.76405235, 0.40015721]])
    c = np.full((3, 2), 16.0)
    np.testing.assert_allclose(add_published_noise(c, 0.5), c + n)
    edge = np.array([[0.1, 16.0], [31.9, 16.0], [16.0, 16.0]])
    clipped = add_published_noise(edge, 0.5)  # 31.9 + 0.49 leaves the square
    np.testing.assert_allclose(clipped, np.clip(edge + n, 0.0, 31.99))


# ------------------------------------------------------------ video scores


def test_summary_curve_is_scotts_1d_kde() -> None:
    v = np.array([0.0, 1.0, 1.0, 4.0])
    # var (n - 1) = (9/4 + 1/4 + 1/4 + 25/4) / 3 = 3, h = sqrt(3) * 4^(-1/5)
    h = math.sqrt(3.0) * 4 ** (-0.2)
    g = np.array([-1.0, 1.0, 2.5])
    want = [sum(math.exp(-((x - vi) / h) ** 2 / 2) for vi in v) / 4 / (math.sqrt(2 * math.pi) * h)
            for x in g]
    np.testing.assert_allclose(summary_curve(v, g), want, rtol=1e-12)
    with pytest.raises(KdeAmdError, match="same probability"):
        summary_curve(np.full(10, 13.8), g)


def test_kl_is_reference_to_video_and_infinite_where_the_video_has_no_mass() -> None:
    assert kl_published([1.0, 1.0], [3.0, 1.0]) == pytest.approx(
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert kl_published([1.0, 0.0], [1.0, 1.0]) == pytest.approx(math.log(2.0))
    assert kl_published([1.0, 1.0], [1.0, 0.0]) == math.inf


def test_summary_scores_reference_is_the_other_videos_clean_mean() -> None:
    rng = np.random.default_rng(4)
    clean = [rng.normal(0, 1, 300) for _ in range(3)]
    noisy = [a + 2.0 for a in clean]
    c, n = summary_scores(clean, noisy)
    grid = np.linspace(min(a.min() for a in clean), max(a.max() for a in noisy), 2000)
    d = [summary_curve(a, grid) for a in clean]
    assert c[0] == pytest.approx(kl_published((d[1] + d[2]) / 2, d[0]), rel=1e-12)
    assert n[2] == pytest.approx(kl_published((d[0] + d[1]) / 2,
                                              summary_curve(noisy[2], grid)), rel=1e-12)
    assert (n > 10 * c).all()


def test_leave_one_out_separates_noisy_moves_on_a_drawn_eight() -> None:
    rng = np.random.default_rng(8)

    def eight(n: int) -> np.ndarray:
        t = np.arange(n) * (1 + 1e-3 * rng.normal()) + rng.uniform(0, 10)
        ph = 2 * np.pi * t / 10
        return np.column_stack([10 + 7 * np.sin(2 * ph), 8 + 5 * np.sin(ph)]) + rng.normal(
            0, 0.05, (n, 2))

    pos = [eight(3000) for _ in range(5)]
    obs = [np.zeros(3000, dtype=np.int8) for _ in pos]
    res = leave_one_out(pos, obs, [0.02, 0.0025])
    clean, noisy = res[0.02]
    assert clean.shape == noisy.shape == (5,)
    assert noisy.min() > clean.max()  # 0.14 px of noise on 0.05 px jitter: all separated
    assert res[0.0025][1].mean() < noisy.mean()
    with pytest.raises(KdeAmdError, match=">= 2 videos"):
        leave_one_out(pos[:1], obs[:1], [0.02])


def test_matches_scipy_gaussian_kde_and_entropy() -> None:
    """Our KDEs and KL against scipy's (the published code's library), when installed."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(6)
    pts = rng.normal([20, 20], [0.5, 0.3], (40, 2))
    train = np.empty((41, 2))
    train[0::2] = [8.0, 8.0]  # every even frame in one cell
    train[1::2] = pts[:20]
    train[-1] = [8.0, 8.0]
    model = PublishedKdeAmd(cells=4, lam=5).fit([train], [np.zeros(41)])
    q = pts[25]
    got = model.score_move(8.0, 8.0, q[0], q[1], 0)
    # cell (row 1, col 1) is on the diagonal: its transposed lookup is itself
    kde = stats.gaussian_kde(train[1::2].T)
    want = float(kde(q)[0])
    assert got == pytest.approx(want + (SMOOTHING + want) / (1 + SMOOTHING), rel=1e-10)
    v = rng.gamma(2.0, 1.0, 500)
    g = np.linspace(0, 12, 50)
    np.testing.assert_allclose(summary_curve(v, g), stats.gaussian_kde(v)(g), rtol=1e-10)
    a, b = rng.uniform(0, 1, 20), rng.uniform(0, 1, 20)
    assert kl_published(a, b) == pytest.approx(float(stats.entropy(a, b)), rel=1e-12)
