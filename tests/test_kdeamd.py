"""KDE-AMD baseline: hand-computed densities, KL, AUC, and the noise protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.stats import roc_auc
from lhtstream.model.kdeamd import (
    NOISE_SIGMA,
    KdeAmd,
    KdeAmdError,
    centre_positions,
    kl_divergence,
    measure_frame_cost,
    spot_positions,
)
from lhtstream.model.kdeamd_published import published_noise
from lhtstream.service.kdeamd_protocol import (
    ProtocolError,
    ProtocolVideo,
    add_position_noise,
    kdeamd_factory,
    run_protocol,
)

# ------------------------------------------------------------ positions


def test_spot_positions_centre_of_mass_and_carry_forward() -> None:
    v = np.zeros((5, 4, 6), dtype=np.uint16)
    # frame 0, 1 empty (take the first spot), frame 2: one pixel at row 1, col 4
    v[2, 1, 4] = 100
    # frame 3: weights 1 at (row 0, col 0) and 3 at (row 2, col 4) -> x = 3, y = 1.5
    v[3, 0, 0] = 10
    v[3, 2, 4] = 30
    # frame 4 empty: carries frame 3 forward
    p = spot_positions(v)
    assert p.shape == (5, 2)
    np.testing.assert_allclose(p[2], [4.0, 1.0])
    np.testing.assert_allclose(p[3], [3.0, 1.5])
    np.testing.assert_allclose(p[4], [3.0, 1.5])
    np.testing.assert_allclose(p[0], [4.0, 1.0])
    np.testing.assert_allclose(p[1], [4.0, 1.0])


def test_spot_positions_rejects_blank_video() -> None:
    with pytest.raises(KdeAmdError, match="no non-zero frame"):
        spot_positions(np.zeros((3, 4, 4), dtype=np.uint16))
    assert issubclass(KdeAmdError, LhtstreamError)


def test_centre_positions_moves_mean() -> None:
    p = np.array([[1.0, 2.0], [3.0, 6.0]])
    c = centre_positions(p, (10.0, -1.0))
    np.testing.assert_allclose(c.mean(axis=0), [10.0, -1.0])
    np.testing.assert_allclose(c[1] - c[0], [2.0, 4.0])


# ------------------------------------------------------------ density


def _hand_kde_density(points: np.ndarray, q: np.ndarray) -> float:
    """Gaussian KDE with Scott's bandwidth H = cov * n^(-1/3) + 1e-4 I, written out."""
    n = len(points)
    mx, my = points[:, 0].mean(), points[:, 1].mean()
    sxx = ((points[:, 0] - mx) ** 2).sum() / (n - 1)
    syy = ((points[:, 1] - my) ** 2).sum() / (n - 1)
    sxy = ((points[:, 0] - mx) * (points[:, 1] - my)).sum() / (n - 1)
    f = n ** (-1.0 / 3.0)
    a, b, d = sxx * f + 1e-4, sxy * f, syy * f + 1e-4
    det = a * d - b * b
    total = 0.0
    for px, py in points:
        dx, dy = q[0] - px, q[1] - py
        m = (d * dx * dx - 2 * b * dx * dy + a * dy * dy) / det
        total += math.exp(-0.5 * m) / (2 * math.pi * math.sqrt(det))
    return total / n


def test_density_of_three_point_cell_matches_formula() -> None:
    # One 1x1 cell; 4 positions -> 3 moves whose ends are the last 3 positions.
    pos = np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 2.0], [0.5, 1.5]])
    obs = np.zeros(4, dtype=np.int8)
    model = KdeAmd(rows=1, cols=1, lam=2).fit([pos], [obs])
    ends = pos[1:] - pos.mean(axis=0)  # centred (centre (0, 0))
    q = np.array([0.7, 0.9])
    expected = _hand_kde_density(ends, q)
    got = model.score_move(0.0, 0.0, q[0], q[1], 0)
    assert got == pytest.approx(-math.log(expected), rel=1e-10)


def test_sparse_cell_falls_back_to_window_kde() -> None:
    rng = np.random.default_rng(3)
    pos = rng.normal(0, 1, (30, 2))
    obs = np.zeros(30, dtype=np.int8)
    # lambda larger than any cell: every move uses the window's global KDE.
    model = KdeAmd(rows=4, cols=4, lam=1000).fit([pos], [obs])
    ends = centre_positions(pos)[1:]
    q = np.array([0.3, -0.2])
    got = model.score_move(-1.0, 1.0, q[0], q[1], 0)
    assert got == pytest.approx(-math.log(_hand_kde_density(ends, q)), rel=1e-10)


def test_batched_move_scores_equal_per_frame_evaluation() -> None:
    rng = np.random.default_rng(5)
    train = [_eight(rng, 800) for _ in range(3)]
    model = KdeAmd(rows=10, cols=10, lam=5).fit([p for p, _ in train], [o for _, o in train])
    p, o = _eight(rng, 200)
    batch = model.move_scores(p, o)
    c = centre_positions(p)
    one = [model.score_move(c[i, 0], c[i, 1], c[i + 1, 0], c[i + 1, 1], int(o[i]))
           for i in range(len(c) - 1)]
    np.testing.assert_allclose(batch, one, rtol=1e-9)
    cost = measure_frame_cost(model, p, o, max_moves=50)
    assert cost["frames"] == 50 and cost["median_us"] > 0
    assert cost["points_median"] > model.lam


def test_obstacle_window_has_its_own_kdes() -> None:
    rng = np.random.default_rng(9)
    # Inside window 1 the spot jumps by +3 px in x each frame; outside it stays put.
    def video() -> tuple[np.ndarray, np.ndarray]:
        n = 600
        o = np.zeros(n, dtype=np.int8)
        o[200:400] = 1
        x = np.where(np.arange(n) % 2 == 0, 0.0, 3.0) * (o == 1)
        p = np.column_stack([x, np.zeros(n)]) + rng.normal(0, 0.1, (n, 2))
        return p, o

    train = [video() for _ in range(3)]
    model = KdeAmd(rows=5, cols=5, lam=5).fit([p for p, _ in train], [o for _, o in train])
    p, o = video()
    c = centre_positions(p)
    i = 250  # a window-1 move starting at x ~ 0 and landing near x ~ 3
    assert c[i + 1, 0] - c[i, 0] > 2.0
    in_window = model.score_move(c[i, 0], c[i, 1], c[i + 1, 0], c[i + 1, 1], 1)
    as_if_outside = model.score_move(c[i, 0], c[i, 1], c[i + 1, 0], c[i + 1, 1], 0)
    assert in_window < as_if_outside - 5.0


def test_errors_name_the_problem() -> None:
    with pytest.raises(KdeAmdError, match="before fit"):
        KdeAmd().score(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(KdeAmdError, match="obstacle states"):
        KdeAmd().fit([np.zeros((5, 2))], [np.zeros(4)])
    with pytest.raises(KdeAmdError, match="NaN"):
        KdeAmd().fit([np.full((5, 2), np.nan)], [np.zeros(5)])


# ------------------------------------------------------------ KL and AUC


def test_kl_divergence() -> None:
    p = np.array([0.2, 0.3, 0.5])
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert kl_divergence(p, np.array([0.5, 0.3, 0.2])) > 0.1
    assert kl_divergence([1.0, 0.0], [0.5, 0.5], eps=0.0) == pytest.approx(math.log(2))
    # eps keeps an empty reference bin finite
    assert math.isfinite(kl_divergence([0.0, 1.0], [1.0, 0.0]))


def test_roc_auc_hand_cases() -> None:
    assert roc_auc([1, 2, 3], [4, 5]) == 1.0
    assert roc_auc([4, 5], [1, 2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    # pairs (pos > neg): 2>1, 2=2 (1/2), 3>1, 3>2 -> 3.5 / 4
    assert roc_auc([1, 2], [2, 3]) == pytest.approx(0.875)
    assert math.isnan(roc_auc([], [1.0]))


# ------------------------------------------------------------ protocol


def _eight(
    rng: np.random.Generator, n: int, jitter: float = 0.12
) -> tuple[np.ndarray, np.ndarray]:
    """A figure-eight at 10 frames per cycle with drifting phase and jitter (px)."""
    t = np.arange(n) * (1.0 + 0.002 * rng.normal()) + rng.uniform(0, 10)
    ph = 2 * np.pi * t / 10
    p = np.column_stack([9 + 7 * np.sin(2 * ph), 7 + 5 * np.sin(ph)])
    p += rng.normal(0, jitter, (n, 2)) + rng.normal(0, 0.3, 2)
    o = np.zeros(n, dtype=np.int8)
    o[n // 3 : n // 2] = 1
    return p, o


def test_noise_is_the_published_sequence_and_only_touches_positions() -> None:
    m = np.zeros((4000, 3))
    v = ProtocolVideo(1, "0001", m, np.zeros(4000, dtype=np.int8), xy=(1, 2))
    a = add_position_noise(v, seed=7)
    other = add_position_noise(ProtocolVideo(2, "0002", m, v.obstacles, xy=(1, 2)), seed=7)
    # as published: the generator re-seeded for every video, so every video gets the same
    np.testing.assert_array_equal(a.measurements, other.measurements)
    np.testing.assert_array_equal(a.positions, published_noise(4000, NOISE_SIGMA, 7))
    assert not np.allclose(a.positions, add_position_noise(v, seed=8).positions)
    assert np.all(a.measurements[:, 0] == 0.0)
    assert a.positions.std(axis=0) == pytest.approx([NOISE_SIGMA] * 2, rel=0.05)
    half = add_position_noise(v, variance=0.005, seed=7)
    np.testing.assert_allclose(half.positions, a.positions / 2, rtol=1e-12)  # std 0.0707 px
    assert np.all(m == 0.0)  # input untouched
    with pytest.raises(ProtocolError, match="outside"):
        run_protocol({}, kdeamd_factory(), variances=(0.0,))
    with pytest.raises(ProtocolError, match="1..8"):
        run_protocol({}, kdeamd_factory(), variances=())


def test_protocol_noisy_videos_score_higher_and_hook_is_leave_one_out() -> None:
    rng = np.random.default_rng(11)
    vids = {
        t: [ProtocolVideo(t, f"{i:04d}", *_eight(rng, 1500, jitter=0.05)) for i in range(4)]
        for t in (1, 2)
    }
    levels = run_protocol(vids, kdeamd_factory(rows=20, cols=20), variances=(0.02, 0.005),
                          seed=1)
    assert list(levels) == [0.02, 0.005]
    res = levels[0.02]
    assert levels[0.005].clean == res.clean  # clean scores do not depend on the level
    assert np.mean(list(levels[0.005].noisy.values())) < np.mean(list(res.noisy.values()))
    clean = np.array(list(res.clean.values()))
    noisy = np.array([res.noisy[k] for k in res.clean])
    assert len(clean) == 8
    assert noisy.mean() > 2 * clean.mean()
    assert res.auc >= 0.9
    assert set(res.per_type) == {1, 2}

    seen: list[tuple[int, list[str]]] = []
    scored: list[ProtocolVideo] = []
    originals = {(v.type, v.name): v for vs in vids.values() for v in vs}

    def factory(type_id, training):
        seen.append((type_id, [v.name for v in training]))

        def scorer(v: ProtocolVideo) -> float:
            scored.append(v)
            return float(len(scored) % 2 == 0)  # the second call of each pair is the noisy one

        return scorer

    res2 = run_protocol(vids, factory, seed=1)[0.02]
    assert len(seen) == 8 and len(scored) == 16
    assert seen[0] == (1, ["0001", "0002", "0003"])
    assert seen[5] == (2, ["0000", "0002", "0003"])
    for clean_v, noisy_v in zip(scored[::2], scored[1::2], strict=True):
        orig = originals[(clean_v.type, clean_v.name)]
        np.testing.assert_array_equal(clean_v.positions, orig.positions)
        diff = noisy_v.positions - orig.positions
        assert diff.std() == pytest.approx(NOISE_SIGMA, rel=0.1)
    assert res2.auc == 1.0
