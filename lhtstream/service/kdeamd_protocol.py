"""The KDE-AMD evaluation protocol (Atienza et al.), for any scorer.

Leave-one-out within a type over normal videos; each held-out video is scored
clean and with independent Gaussian position noise (variance 0.02 px^2 by
default); the pooled ROC AUC compares the two. `kdeamd_protocol` runs it for
our model (measure -> noise on X/Y -> the monitor's own per-frame path) and
for the KDE-AMD baseline on the same folds and the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lhtstream.base.stats import roc_auc
from lhtstream.kernels import features as F
from lhtstream.kernels.features import track
from lhtstream.model import kdeamd as K
from lhtstream.model.detector import calibrate
from lhtstream.model.kdeamd import NOISE_SIGMA, KdeAmd
from lhtstream.model.normality import NormalityModel
from lhtstream.service.pipeline import StreamPipeline, offline_header

STREAM = "protocol"
#: Per-frame timings kept for the cost medians (a sample is enough).
_MAX_TIMINGS = 200_000
#: KDE-AMD frames timed per fitted model (its per-frame cost), and models timed.
_KDE_TIMED_MOVES = 1000
_KDE_TIMED_MODELS = 8


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class ProtocolVideo:
    """One normal video as the protocol sees it.

    ``measurements`` is ``(frames, k)`` float64; columns ``xy`` hold the
    extracted spot position (px) that the protocol perturbs. For KDE-AMD it is
    just ``spot_positions(video)``; another model can pass its own per-frame
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


def add_position_noise(
    video: ProtocolVideo, sigma: float = NOISE_SIGMA, seed: int = 0
) -> ProtocolVideo:
    """The video with independent N(0, sigma^2) px noise on x and y of every frame.

    The noise depends only on (seed, type, name), so every model evaluated with
    the same seed sees exactly the same noisy videos.
    """
    key = [int(seed), int(video.type)] + [ord(ch) for ch in video.name]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    m = np.array(video.measurements, dtype=np.float64, copy=True)
    cols = list(video.xy)
    m[:, cols] += rng.normal(0.0, sigma, size=(m.shape[0], 2))
    return ProtocolVideo(video.type, video.name, m, video.obstacles, video.xy)


@dataclass
class ProtocolResult:
    """Scores and AUCs of one protocol run."""

    auc: float  # pooled over all types
    per_type: dict[int, float]
    clean: dict[tuple[int, str], float] = field(default_factory=dict)
    noisy: dict[tuple[int, str], float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "auc": self.auc,
            "per_type": {str(k): v for k, v in self.per_type.items()},
            "videos": len(self.clean),
            "seconds": self.seconds,
        }


def run_protocol(
    videos_by_type: Mapping[int, Sequence[ProtocolVideo]],
    score_fn_factory: ScorerFactory,
    sigma: float = NOISE_SIGMA,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ProtocolResult:
    """The KDE-AMD evaluation protocol, for any scorer.

    For each type and each of its normal videos v: fit on the type's other
    videos (``score_fn_factory(type, others)``), score v clean and v with
    position noise (``add_position_noise(v, sigma, seed)``). The pooled AUC
    compares all clean scores (negatives) with all noisy ones (positives).
    Types with fewer than 2 videos are skipped.
    """
    t0 = time.perf_counter()
    clean: dict[tuple[int, str], float] = {}
    noisy: dict[tuple[int, str], float] = {}
    per_type: dict[int, float] = {}
    for type_id in sorted(videos_by_type):
        vids = list(videos_by_type[type_id])
        if len(vids) < 2:
            continue
        tc, tn = [], []
        for i, v in enumerate(vids):
            scorer = score_fn_factory(type_id, vids[:i] + vids[i + 1 :])
            tc.append(float(scorer(v)))
            tn.append(float(scorer(add_position_noise(v, sigma, seed))))
            clean[(type_id, v.name)] = tc[-1]
            noisy[(type_id, v.name)] = tn[-1]
        per_type[type_id] = roc_auc(tc, tn)
        if progress is not None:
            progress(f"type {type_id}: auc {per_type[type_id]:.3f} ({len(vids)} videos)")
    auc = roc_auc(list(clean.values()), list(noisy.values()))
    return ProtocolResult(auc, per_type, clean, noisy, time.perf_counter() - t0)


def kdeamd_factory(**params) -> ScorerFactory:
    """Scorer factory for ``run_protocol`` running KDE-AMD with ``KdeAmd(**params)``."""

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
    fresh pipeline's `process_measured`; per-frame µs go to ``timings[offset:]``."""

    pipe = StreamPipeline(STREAM, model=model)
    pipe.start_video(video.name, video.type, None)
    header = offline_header(STREAM, video.name, video.type)
    m = np.ascontiguousarray(video.measurements)
    obs = [int(o) for o in video.obstacles]
    clock = time.perf_counter_ns
    step = pipe.process_measured
    cap = 0 if timings is None else max(len(timings) - offset, 0)
    for i in range(m.shape[0]):
        header["frame"] = i
        header["obstacle"] = obs[i]
        if i < cap:
            t0 = clock()
            step(m[i], header)
            timings[offset + i] = (clock() - t0) / 1000.0
        else:
            step(m[i], header)
    verdict = pipe.end_video()
    return float(verdict.score), min(cap, m.shape[0])


def kdeamd_protocol(videos: Sequence[Any], baseline: bool = True, seed: int = 0,
                    progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """The KDE-AMD protocol on normal data-set videos, for our model and (optionally) KDE-AMD.

    Leave-one-out within each type for both methods (the same folds, the same noise:
    `kdeamd.add_position_noise` keys the noise on (seed, type, name)).
    """

    ours_by_type: dict[int, list] = {}
    kde_by_type: dict[int, list] = {}
    for i, v in enumerate(videos):
        progress(f"protocol: measuring {i + 1}/{len(videos)} Type{v.type}/{v.name}")
        frames = v.load()
        obs = np.asarray(v.obstacle_states(), dtype=np.int64)
        ours_by_type.setdefault(v.type, []).append(
            ProtocolVideo(v.type, v.name, F.measure_video(frames), obs, (F.X, F.Y)))
        if baseline:
            kde_by_type.setdefault(v.type, []).append(
                ProtocolVideo(v.type, v.name, K.spot_positions(frames), obs))
    usable = {t: vs for t, vs in ours_by_type.items() if len(vs) >= 2}
    if not usable:
        return {"skipped": "needs a type with at least 2 normal videos"}
    n_scored = sum(len(vs) for vs in usable.values())
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
            progress(f"protocol (ours): {state['done']}/{2 * n_scored} scorings")
            return score

        return scorer

    res = run_protocol(usable, ours_factory, seed=seed)
    t = timings[: state["timed"]]
    out: dict[str, Any] = {
        "folds": "leave-one-out within type (both methods)",
        "noise_variance_px2": K.NOISE_VARIANCE,
        "seed": seed,
        "types": len(usable),
        "videos": n_scored,
        "auc": res.auc,
        "per_type": {str(k): v for k, v in res.per_type.items()},
        "cost_us": float(np.median(t)) if len(t) else None,
        "cost_us_p99": float(np.quantile(t, 0.99)) if len(t) else None,
        "seconds": res.seconds,
        "fit_seconds": state["fit_s"],
        "clean_scores": {f"{k[0]}/{k[1]}": v for k, v in res.clean.items()},
        "noisy_scores": {f"{k[0]}/{k[1]}": v for k, v in res.noisy.items()},
    }
    if not baseline:
        out["auc_baseline"] = None
        return out
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
            progress(f"protocol (KDE-AMD): {kstate['done']}/{2 * n_scored} scorings")
            return model.score(video.positions, video.obstacles)

        return scorer

    usable_kde = {t: kde_by_type[t] for t in usable}
    kres = run_protocol(usable_kde, kde_factory, seed=seed)
    out.update({
        "auc_baseline": kres.auc,
        "per_type_baseline": {str(k): v for k, v in kres.per_type.items()},
        # the grid the folds used (KdeAmd's defaults, the paper's setting), not a copy of it
        "baseline": {"rows": kdeamd_grid.rows, "cols": kdeamd_grid.cols,
                     "lambda": kdeamd_grid.lam},
        "cost_us_baseline": float(np.median(kde_costs)) if kde_costs else None,
        "baseline_points_per_frame": float(np.median(kde_points)) if kde_points else None,
        "seconds_baseline": kres.seconds,
        "clean_scores_baseline": {f"{k[0]}/{k[1]}": v for k, v in kres.clean.items()},
        "noisy_scores_baseline": {f"{k[0]}/{k[1]}": v for k, v in kres.noisy.items()},
    })
    return out

