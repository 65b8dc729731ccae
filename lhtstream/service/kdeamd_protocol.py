"""The KDE-AMD evaluation protocol (Atienza et al.), for any scorer and both baselines.

Leave-one-out within a type over normal videos; each held-out video is scored
clean and with independent Gaussian position noise of each requested variance
(0.02 px^2 as published); the pooled ROC AUC compares clean with noisy scores.
The noise is the published sequence (`published_noise`: seed 0 for every video),
so every scorer sees the same noisy positions. `kdeamd_protocol` runs it for our
model (measure -> noise on X/Y -> the monitor's own per-frame path), for KDE-AMD
as published (`lhtstream.model.kdeamd_published`, the baseline) and for the
paper-faithful KDE-AMD (`lhtstream.model.kdeamd`, the second baseline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.stats import roc_auc
from lhtstream.kernels import features as F
from lhtstream.kernels.features import track
from lhtstream.model import kdeamd as K
from lhtstream.model import kdeamd_published as KP
from lhtstream.model.detector import calibrate
from lhtstream.model.kdeamd import NOISE_VARIANCE, KdeAmd
from lhtstream.model.normality import NormalityModel
from lhtstream.service.pipeline import StreamPipeline, offline_header

STREAM = "protocol"
#: Per-frame timings kept for the cost medians (a sample is enough).
_MAX_TIMINGS = 200_000
#: KDE-AMD frames timed per fitted model (its per-frame cost), and models timed.
_KDE_TIMED_MOVES = 1000
_KDE_TIMED_MODELS = 8
#: Bounds on what `noise_levels` accepts: how many variances, and each in (0, MAX] px^2.
MAX_NOISE_LEVELS = 8
MAX_NOISE_VARIANCE = 1.0


def _quiet(message: str) -> None:
    pass


class ProtocolError(LhtstreamError, ValueError):
    """A protocol setting out of range (noise variances)."""


def noise_levels(variances: Sequence[float]) -> tuple[float, ...]:
    """The protocol's noise variances (px^2), checked: 1..8 distinct values in (0, 1]."""
    levels = tuple(float(v) for v in variances)
    if not 1 <= len(levels) <= MAX_NOISE_LEVELS:
        raise ProtocolError(f"give 1..{MAX_NOISE_LEVELS} noise variances, got {len(levels)}")
    for v in levels:
        if not (math.isfinite(v) and 0.0 < v <= MAX_NOISE_VARIANCE):
            raise ProtocolError(f"noise variance {v} px^2 is outside (0, {MAX_NOISE_VARIANCE:g}]")
    if len(set(levels)) != len(levels):
        raise ProtocolError(f"noise variances {list(levels)} repeat a value")
    return levels


@dataclass(frozen=True)
class ProtocolVideo:
    """One normal video as the protocol sees it.

    ``measurements`` is ``(frames, k)`` float64; columns ``xy`` hold the
    extracted spot position (px) that the protocol perturbs. For KDE-AMD it is
    just its spot positions; another model can pass its own per-frame
    measurement matrix (e.g. ``lhtstream.kernels.features`` measurements with
    ``xy=(features.X, features.Y)``) and rebuild whatever it derives from them.
    """

    type: int
    name: str
    measurements: np.ndarray
    obstacles: np.ndarray
    xy: tuple[int, int] = (0, 1)

    @property
    def positions(self) -> np.ndarray:
        return self.measurements[:, list(self.xy)]


#: A scorer factory: given a type and its training videos, return a function
#: that scores one video (higher = more anomalous).
ScorerFactory = Callable[[int, Sequence[ProtocolVideo]], Callable[[ProtocolVideo], float]]


def add_position_noise(video: ProtocolVideo, *, variance: float = NOISE_VARIANCE,
                       seed: int = 0) -> ProtocolVideo:
    """The video with N(0, variance) px noise on x and y of every frame.

    The published sequence (`kdeamd_published.published_noise`): the generator is
    seeded with ``seed`` for every video, so every video and every scorer gets the
    same noise. (KDE-AMD as published clips its noisy positions to its 0..32 px
    square; `published_protocol` does that in its own coordinates.)
    """
    m = np.array(video.measurements, dtype=np.float64, copy=True)
    cols = list(video.xy)
    m[:, cols] += KP.published_noise(m.shape[0], math.sqrt(variance), seed)
    return ProtocolVideo(video.type, video.name, m, video.obstacles, video.xy)


@dataclass
class ProtocolResult:
    """Scores and AUCs of one protocol run at one noise variance (px^2)."""

    variance: float
    auc: float  # pooled over all types
    per_type: dict[int, float]
    clean: dict[tuple[int, str], float] = field(default_factory=dict)
    noisy: dict[tuple[int, str], float] = field(default_factory=dict)
    seconds: float = 0.0  # the whole run (every level)

    def as_dict(self) -> dict:
        return {
            "noise_variance_px2": self.variance,
            "auc": self.auc,
            "per_type": {str(k): v for k, v in self.per_type.items()},
            "videos": len(self.clean),
            "seconds": self.seconds,
        }


def _usable(videos_by_type: Mapping[int, Sequence[ProtocolVideo]]
            ) -> list[tuple[int, list[ProtocolVideo]]]:
    """(type, videos) of the types with at least two videos (leave-one-out needs them)."""
    return [(t, list(videos_by_type[t])) for t in sorted(videos_by_type)
            if len(videos_by_type[t]) >= 2]


def _results(levels: Sequence[float], clean: Mapping[float, dict], noisy: Mapping[float, dict],
             types: Sequence[int], seconds: float) -> dict[float, ProtocolResult]:
    out = {}
    for v in levels:
        per_type = {t: roc_auc([s for (tt, _), s in clean[v].items() if tt == t],
                               [s for (tt, _), s in noisy[v].items() if tt == t])
                    for t in types}
        auc = roc_auc(list(clean[v].values()), list(noisy[v].values()))
        out[v] = ProtocolResult(v, auc, per_type, dict(clean[v]), dict(noisy[v]), seconds)
    return out


def run_protocol(
    videos_by_type: Mapping[int, Sequence[ProtocolVideo]],
    score_fn_factory: ScorerFactory,
    variances: Sequence[float] = (NOISE_VARIANCE,),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[float, ProtocolResult]:
    """The KDE-AMD evaluation protocol for any scorer: ``{variance: result}``.

    For each type and each of its normal videos v: fit on the type's other
    videos (``score_fn_factory(type, others)``), score v clean, then v with
    `add_position_noise` of each variance (px^2). Each level's pooled AUC compares
    all clean scores (negatives) with all its noisy ones (positives). Types with
    fewer than 2 videos are skipped.
    """
    levels = noise_levels(variances)
    t0 = time.perf_counter()
    clean: dict[tuple[int, str], float] = {}
    noisy: dict[float, dict[tuple[int, str], float]] = {v: {} for v in levels}
    usable = _usable(videos_by_type)
    for type_id, vids in usable:
        for i, v in enumerate(vids):
            scorer = score_fn_factory(type_id, vids[:i] + vids[i + 1:])
            clean[(type_id, v.name)] = float(scorer(v))
            for var in levels:
                noisy[var][(type_id, v.name)] = float(
                    scorer(add_position_noise(v, variance=var, seed=seed)))
        if progress is not None:
            progress(f"type {type_id}: {len(vids)} videos scored")
    return _results(levels, {v: clean for v in levels}, noisy, [t for t, _ in usable],
                    time.perf_counter() - t0)


def published_protocol(
    videos_by_type: Mapping[int, Sequence[ProtocolVideo]],
    variances: Sequence[float] = (NOISE_VARIANCE,),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cells: int = KP.CELLS,
    lam: int = KP.LAMBDA,
) -> dict[float, ProtocolResult]:
    """The protocol for KDE-AMD as published (`kdeamd_published.leave_one_out`).

    Its scores need the whole type at once (the summary grid spans every video,
    clean and noisy, at each level), so it is not a `run_protocol` scorer; the folds
    and the noise are the same. ``positions`` of each video are its
    `published_positions`.
    """
    levels = noise_levels(variances)
    t0 = time.perf_counter()
    clean: dict[float, dict[tuple[int, str], float]] = {v: {} for v in levels}
    noisy: dict[float, dict[tuple[int, str], float]] = {v: {} for v in levels}
    usable = _usable(videos_by_type)
    for type_id, vids in usable:
        report = None if progress is None else (
            lambda msg, t=type_id: progress(f"type {t}: {msg}"))
        scores = KP.leave_one_out([v.positions for v in vids], [v.obstacles for v in vids],
                                  levels, seed=seed, cells=cells, lam=lam,
                                  names=[f"Type{type_id}/{v.name}" for v in vids],
                                  progress=report)
        for var, (c, n) in scores.items():
            for v, cs, ns in zip(vids, c, n, strict=True):
                clean[var][(type_id, v.name)] = float(cs)
                noisy[var][(type_id, v.name)] = float(ns)
    return _results(levels, clean, noisy, [t for t, _ in usable], time.perf_counter() - t0)


def kdeamd_factory(**params) -> ScorerFactory:
    """Scorer factory for ``run_protocol`` running the paper-faithful ``KdeAmd(**params)``."""

    def factory(
        type_id: int, training: Sequence[ProtocolVideo]
    ) -> Callable[[ProtocolVideo], float]:
        model = KdeAmd(**params).fit(
            [v.positions for v in training], [v.obstacles for v in training]
        )
        return lambda v: model.score(v.positions, v.obstacles)

    return factory


def _fit_fold(training: Sequence[Any]) -> Any:
    """Our model for one protocol fold: fit on the fold's clean training videos, thresholds
    calibrated on the same videos (they gate online adaptation and scale the verdict score,
    which is expressed relative to the thresholds; see docs/model.md)."""

    rows = [(v.type, track(v.measurements, v.obstacles)) for v in training]
    model = NormalityModel.fit(rows)
    calibrate(model, rows)
    return model


def score_measured(model: Any, video: Any, timings: np.ndarray | None = None,
                   offset: int = 0) -> tuple[float, int]:
    """Verdict score of a protocol video (measured rows, perhaps with noisy X/Y) through a
    fresh pipeline's `process_measured` (one compiled call per block of frames); the
    per-frame µs (the block's time / its frames) go to ``timings[offset:]``."""

    pipe = StreamPipeline(STREAM, model=model)
    pipe.start_video(video.name, video.type, None)
    header = offline_header(STREAM, video.name, video.type)
    frames = len(video.measurements)
    t0 = time.perf_counter_ns()
    pipe.process_measured(video.measurements, video.obstacles, header)
    per_frame = (time.perf_counter_ns() - t0) / 1000.0 / max(frames, 1)
    timed = 0 if timings is None else min(max(len(timings) - offset, 0), frames)
    if timed:
        timings[offset:offset + timed] = per_frame
    verdict = pipe.end_video()
    return float(verdict.score), timed


def _method(result: ProtocolResult, suffix: str, clean: bool = True) -> dict[str, Any]:
    """A method's report keys at one level: ``auc``, ``per_type``, ``clean_scores``,
    ``noisy_scores``, each with ``suffix`` (``_baseline``, ``_baseline_paper``)."""
    out = {f"auc{suffix}": result.auc,
           f"per_type{suffix}": {str(k): v for k, v in result.per_type.items()},
           f"noisy_scores{suffix}": {f"{k[0]}/{k[1]}": v for k, v in result.noisy.items()}}
    if clean:
        out[f"clean_scores{suffix}"] = {f"{k[0]}/{k[1]}": v for k, v in result.clean.items()}
    return out


def kdeamd_protocol(videos: Sequence[Any], baseline: bool = True,
                    variances: Sequence[float] = (NOISE_VARIANCE,), seed: int = 0,
                    progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """The KDE-AMD protocol on normal data-set videos: ours and (optionally) both baselines.

    The same leave-one-out folds and the same noise for every method. The top-level
    keys describe the primary level (0.02 px^2 when requested, else the first);
    ``levels`` has every variance's AUCs and noisy scores. ``*_baseline`` is KDE-AMD as
    published, ``*_baseline_paper`` the paper-faithful KDE-AMD.
    """
    levels = noise_levels(variances)
    primary = NOISE_VARIANCE if NOISE_VARIANCE in levels else levels[0]
    ours_by_type: dict[int, list] = {}
    pub_by_type: dict[int, list] = {}
    paper_by_type: dict[int, list] = {}
    for i, v in enumerate(videos):
        progress(f"protocol: measuring {i + 1}/{len(videos)} Type{v.type}/{v.name}")
        frames = v.load()
        obs = np.asarray(v.obstacle_states(), dtype=np.int64)
        ours_by_type.setdefault(v.type, []).append(
            ProtocolVideo(v.type, v.name, F.measure_video(frames), obs, (F.X, F.Y)))
        if baseline:
            pub_by_type.setdefault(v.type, []).append(
                ProtocolVideo(v.type, v.name, KP.published_positions(frames), obs))
            paper_by_type.setdefault(v.type, []).append(
                ProtocolVideo(v.type, v.name, K.spot_positions(frames), obs))
    usable = {t: vs for t, vs in ours_by_type.items() if len(vs) >= 2}
    if not usable:
        return {"skipped": "needs a type with at least 2 normal videos"}
    n_scored = sum(len(vs) for vs in usable.values())
    n_scorings = (1 + len(levels)) * n_scored
    timings = np.empty(_MAX_TIMINGS)
    state = {"timed": 0, "done": 0, "fit_s": 0.0}

    def ours_factory(type_id: int, training: Sequence[Any]) -> Callable[[Any], float]:
        t0 = time.perf_counter()
        model = _fit_fold(training)
        state["fit_s"] += time.perf_counter() - t0

        def scorer(video: Any) -> float:
            score, n = score_measured(model, video, timings, state["timed"])
            state["timed"] += n
            state["done"] += 1
            progress(f"protocol (ours): {state['done']}/{n_scorings} scorings")
            return score

        return scorer

    res = run_protocol(usable, ours_factory, levels, seed=seed)
    t = timings[: state["timed"]]
    main = res[primary]
    out: dict[str, Any] = {
        "folds": "leave-one-out within type (every method)",
        "noise": "N(0, variance) px on x and y, the published sequence: seed 0 for every video",
        "noise_variance_px2": primary,
        "noise_variances_px2": list(levels),
        "seed": seed,
        "types": len(usable),
        "videos": n_scored,
        **_method(main, ""),
        "cost_us": float(np.median(t)) if len(t) else None,
        "cost_us_p99": float(np.quantile(t, 0.99)) if len(t) else None,
        "seconds": main.seconds,
        "fit_seconds": state["fit_s"],
    }
    rows = [{"noise_variance_px2": v, **_method(res[v], "", clean=False)} for v in levels]
    out["levels"] = rows
    if not baseline:
        out["auc_baseline"] = out["auc_baseline_paper"] = None
        return out

    # KDE-AMD as published (the baseline)
    pub_types = {t: pub_by_type[t] for t in usable}
    pres = published_protocol(pub_types, levels, seed=seed,
                              progress=lambda msg: progress(f"protocol (KDE-AMD as published): "
                                                            f"{msg}"))
    first = pub_types[min(pub_types)]
    cen = [KP.centre_published(v.positions, f"Type{v.type}/{v.name}") for v in first]
    timed_model = KP.PublishedKdeAmd().fit(cen[1:], [v.obstacles for v in first[1:]])
    cost = KP.measure_frame_cost(timed_model, cen[0], first[0].obstacles,
                                 max_moves=_KDE_TIMED_MOVES * _KDE_TIMED_MODELS)
    pmain = pres[primary]
    out.update({
        **_method(pmain, "_baseline"),
        "baseline": {"method": "KDE-AMD as published", "rows": timed_model.cells,
                     "cols": timed_model.cells, "lambda": timed_model.lam},
        "cost_us_baseline": cost["median_us"],
        "cost_us_baseline_p99": cost["p99_us"],
        "baseline_hit_fraction": cost["hit_fraction"],
        "baseline_points_per_frame": cost["points_median"],
        "seconds_baseline": pmain.seconds,
    })
    for row, v in zip(rows, levels, strict=True):
        # as published, clean scores move with the level (its summary grid spans the
        # noisy series), so each level keeps them
        row.update(_method(pres[v], "_baseline"))

    # the paper-faithful KDE-AMD (the second baseline)
    kdeamd_grid = KdeAmd()
    kde_costs: list[float] = []
    kde_points: list[float] = []
    kstate = {"done": 0}

    def kde_factory(type_id: int, training: Sequence[Any]) -> Callable[[Any], float]:
        model = KdeAmd().fit([v.positions for v in training], [v.obstacles for v in training])
        timed = len(kde_costs) < _KDE_TIMED_MODELS

        def scorer(video: Any) -> float:
            if timed and len(kde_costs) < _KDE_TIMED_MODELS:
                c = K.measure_frame_cost(model, video.positions, video.obstacles,
                                         max_moves=_KDE_TIMED_MOVES)
                kde_costs.append(c["median_us"])
                kde_points.append(c["points_median"])
            kstate["done"] += 1
            progress(f"protocol (KDE-AMD, paper): {kstate['done']}/{n_scorings} scorings")
            return model.score(video.positions, video.obstacles)

        return scorer

    kres = run_protocol({t: paper_by_type[t] for t in usable}, kde_factory, levels, seed=seed)
    kmain = kres[primary]
    out.update({
        **_method(kmain, "_baseline_paper"),
        # the grid the folds used (KdeAmd's defaults, the paper's setting), not a copy of it
        "baseline_paper": {"method": "KDE-AMD, paper-faithful", "rows": kdeamd_grid.rows,
                           "cols": kdeamd_grid.cols, "lambda": kdeamd_grid.lam},
        "cost_us_baseline_paper": float(np.median(kde_costs)) if kde_costs else None,
        "baseline_paper_points_per_frame": float(np.median(kde_points)) if kde_points else None,
        "seconds_baseline_paper": kmain.seconds,
    })
    for row, v in zip(rows, levels, strict=True):
        row.update(_method(kres[v], "_baseline_paper", clean=False))
    return out
