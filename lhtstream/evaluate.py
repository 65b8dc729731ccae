"""Offline evaluation through the monitor's own per-frame code path.

`evaluate(data, model)` replays every video of a labelled data set through a
`StreamPipeline` exactly as the monitor does (``start_video``, then
``process(frame, header)`` per frame with the header fields the monitor gets
from the wire, then ``end_video_events``), and reports against ``labels.csv``:

- ``auc_videos``: ROC AUC of the verdict score, normal vs anomalous videos;
- ``per_kind``: detection (an alarm *raised* between onset and end + 100
  frames; ``detected_fraction`` counts only alarms of the kind
  `detector.ALARM_KIND_FOR_ANOMALY` expects, ``detected_any_kind_fraction``
  any kind) and delays (onset to first such raise, frames);
- ``false_alarms_per_hour``: raises on normal videos per hour of footage
  (1000 frames = 1 s), with a one-sided 95 % Poisson upper bound;
- ``kdeamd_protocol``: the published KDE-AMD protocol on the normal videos
  (leave-one-out within a type, clean vs N(0, 0.02 px^2) position noise) for
  our model (measure -> noise on X/Y -> ``process_measured`` per frame) and
  for `lhtstream.kdeamd` on the same folds and the same noise.

Each video gets a fresh pipeline (a monitor started with the model file on
that video): scores do not depend on the order of videos or on the selection.
Units: frames (1 frame = 1 ms), hours of footage, costs in µs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.errors import LhtstreamError

#: An alarm counts as a detection when raised in [onset, end + DETECTION_SLACK] frames.
DETECTION_SLACK = 100
FRAMES_PER_HOUR = 3_600_000.0
STREAM = "evaluate"
#: Per-frame timings kept for the cost medians (a sample is enough).
_MAX_TIMINGS = 200_000
#: KDE-AMD frames timed per fitted model (its per-frame cost), and models timed.
_KDE_TIMED_MOVES = 1000
_KDE_TIMED_MODELS = 8


class EvaluateError(LhtstreamError):
    """The data set or model cannot be evaluated (no labels, no videos, unknown types)."""


# ------------------------------------------------------------------ progress


class Progress:
    """One status line on stderr: rewritten in place on a tty, else at most every few s."""

    def __init__(self, stream: Any = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._last = -math.inf
        self._width = 0

    def __call__(self, message: str) -> None:
        if self.tty:
            pad = max(self._width - len(message), 0)
            self.stream.write("\r" + message + " " * pad)
            self._width = len(message)
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(message, file=self.stream, flush=True)

    def done(self, message: str) -> None:
        """A line that stays (end of a stage)."""
        if self.tty:
            self(message)
            self.stream.write("\n")
            self._width = 0
            self.stream.flush()
        else:
            print(message, file=self.stream, flush=True)
            self._last = time.monotonic()


def _quiet(message: str) -> None:
    pass


# ------------------------------------------------------------------ one video


@dataclass
class VideoResult:
    """What the monitor path said about one video; frames are video frame indices."""

    type: int
    name: str
    kind: str  # label kind, "normal" when unlabelled
    onset: int | None
    end: int | None
    frames: int
    score: float  # verdict score
    anomalous: bool  # verdict
    raises: list[tuple[int, str]] = field(default_factory=list)  # (frame, kind)
    frame_us: np.ndarray | None = None  # per-frame time of pipeline.process, µs
    level: np.ndarray | None = None  # per-frame max smoothed score / raise threshold


def monitor_header(video: str, type_id: int) -> dict[str, Any]:
    """A frame header with the fields the monitor's pipeline reads from the wire."""
    return {"stream": STREAM, "video": str(video), "type": int(type_id), "frame": 0,
            "t_ns": 0, "obstacle": 0}


def run_video(pipeline: Any, name: str, type_id: int, frames: np.ndarray,
              obstacles: np.ndarray, metadata: dict | None = None, *,
              timelines: bool = False, timings: bool = True) -> tuple[Any, list, np.ndarray | None,
                                                                       np.ndarray | None]:
    """Drive `pipeline` over one video's frames as the monitor does.

    Returns (verdict, alarm events, per-frame µs or None, per-frame level or None).
    ``frames`` is (n, rows, cols) uint16; ``obstacles`` (n,) of 0/1/2.
    """
    events: list = list(pipeline.start_video(name, type_id, metadata))
    header = monitor_header(name, type_id)
    n = frames.shape[0]
    obs = [int(o) for o in obstacles]
    us = np.empty(n) if timings else None
    level = np.empty(n, dtype=np.float32) if timelines else None
    clock = time.perf_counter_ns
    process = pipeline.process
    for i in range(n):
        header["frame"] = i
        header["obstacle"] = obs[i]
        t0 = clock()
        ev = process(frames[i], header)
        if us is not None:
            us[i] = (clock() - t0) / 1000.0
        if ev:
            events.extend(ev)
        if level is not None:
            det = pipeline.detector
            level[i] = (float(np.max(det.smooth / det.raise_thr)) if det is not None
                        else np.nan)
    tail = pipeline.end_video_events()
    verdict = tail[-1]
    events.extend(tail[:-1])
    return verdict, [e for e in events if hasattr(e, "state")], us, level


def score_video(model: Any, video: Any, label: Any = None, *, timelines: bool = False
                ) -> VideoResult:
    """One data-set video through a fresh monitor pipeline with `model`."""
    from lhtstream.pipeline import StreamPipeline

    frames = video.load()
    pipe = StreamPipeline(STREAM, model=model)
    verdict, alarms, us, level = run_video(pipe, video.name, video.type, frames,
                                           video.obstacle_states(), video.metadata,
                                           timelines=timelines)
    kind = label.kind if label is not None else "normal"
    return VideoResult(
        type=video.type, name=video.name, kind=kind,
        onset=None if label is None else label.onset_frame,
        end=None if label is None else label.end_frame,
        frames=int(verdict.frames), score=float(verdict.score),
        anomalous=bool(verdict.anomalous),
        raises=[(int(a.frame), str(a.kind)) for a in alarms if a.state == "raise"],
        frame_us=us, level=level,
    )


# ------------------------------------------------------------------ statistics


def poisson_upper(k: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a Poisson mean after observing `k` events."""
    alpha = 1.0 - confidence

    def cdf(lam: float) -> float:
        term = math.exp(-lam)
        total = term
        for i in range(1, k + 1):
            term *= lam / i
            total += term
        return total

    lo, hi = float(k), float(k) + 10.0 * math.sqrt(k + 1) + 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def roc_curve(neg: Sequence[float], pos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0,0) to (1,1)."""
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    thr = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.array([0.0] + [float((neg >= t).mean()) if len(neg) else 0.0 for t in thr])
    tpr = np.array([0.0] + [float((pos >= t).mean()) if len(pos) else 0.0 for t in thr])
    return fpr, tpr


def _median(v: Sequence[float]) -> float | None:
    return float(np.median(v)) if len(v) else None


def _p95(v: Sequence[float]) -> float | None:
    return float(np.quantile(v, 0.95)) if len(v) else None


def _frac(k: int, n: int) -> float | None:
    return k / n if n else None


def detection(result: VideoResult, expected: str | None,
              slack: int = DETECTION_SLACK) -> dict[str, Any]:
    """First raise of the expected kind / of any kind within [onset, end + slack]."""
    out: dict[str, Any] = {"right": None, "any": None, "before_onset": 0}
    if result.onset is None:
        return out
    end = (result.end if result.end is not None else result.frames - 1) + slack
    for frame, kind in result.raises:
        if frame < result.onset:
            out["before_onset"] += 1
            continue
        if frame > end:
            continue
        if out["any"] is None:
            out["any"] = frame - result.onset
        if out["right"] is None and kind == expected:
            out["right"] = frame - result.onset
    return out


def summarise(results: Sequence[VideoResult]) -> dict[str, Any]:
    """The monitor-path metrics (auc_videos, per_kind, false alarms, verdicts, cost)."""
    from lhtstream.detector import ALARM_KIND_FOR_ANOMALY
    from lhtstream.kdeamd import roc_auc

    normal = [r for r in results if r.kind == "normal"]
    anomalous = [r for r in results if r.kind != "normal"]
    neg = [r.score for r in normal]
    report: dict[str, Any] = {
        "videos": len(results),
        "normal_videos": len(normal),
        "anomalous_videos": len(anomalous),
        "auc_videos": roc_auc(neg, [r.score for r in anomalous]),
    }
    per_kind: dict[str, Any] = {}
    for kind in sorted({r.kind for r in anomalous}):
        rs = [r for r in anomalous if r.kind == kind]
        expected = ALARM_KIND_FOR_ANOMALY.get(kind)
        dets = [detection(r, expected) for r in rs]
        right = [d["right"] for d in dets if d["right"] is not None]
        anyk = [d["any"] for d in dets if d["any"] is not None]
        raised: dict[str, int] = {}
        for r in rs:
            end = (r.end if r.end is not None else r.frames - 1) + DETECTION_SLACK
            for frame, k in r.raises:
                if r.onset is not None and r.onset <= frame <= end:
                    raised[k] = raised.get(k, 0) + 1
        per_kind[kind] = {
            "videos": len(rs),
            "expected_alarm_kind": expected,
            "detected_fraction": _frac(len(right), len(rs)),
            "detected_any_kind_fraction": _frac(len(anyk), len(rs)),
            "delay_frames_median": _median(right),
            "delay_frames_p95": _p95(right),
            "delay_any_kind_median": _median(anyk),
            "alarm_kinds_in_window": dict(sorted(raised.items())),
            "alarms_before_onset": int(sum(d["before_onset"] for d in dets)),
            "verdict_anomalous_fraction": _frac(sum(r.anomalous for r in rs), len(rs)),
            "auc_vs_normal": roc_auc(neg, [r.score for r in rs]),
        }
    report["per_kind"] = per_kind
    frames = sum(r.frames for r in normal)
    hours = frames / FRAMES_PER_HOUR
    fa = sum(len(r.raises) for r in normal)
    by_kind: dict[str, int] = {}
    for r in normal:
        for _, k in r.raises:
            by_kind[k] = by_kind.get(k, 0) + 1
    report["false_alarms"] = fa
    report["false_alarms_by_kind"] = dict(sorted(by_kind.items()))
    report["footage_hours"] = hours
    report["false_alarms_per_hour"] = fa / hours if hours > 0 else None
    report["false_alarms_per_hour_upper95"] = poisson_upper(fa) / hours if hours > 0 else None
    report["normal_videos_with_alarms"] = sum(1 for r in normal if r.raises)
    report["verdicts"] = {
        "normal_flagged_fraction": _frac(sum(r.anomalous for r in normal), len(normal)),
        "anomalous_flagged_fraction": _frac(sum(r.anomalous for r in anomalous), len(anomalous)),
    }
    times = [r.frame_us for r in results if r.frame_us is not None]
    if times:
        allt = np.concatenate(times)
        report["monitor_frame_us"] = {"median": float(np.median(allt)),
                                      "p99": float(np.quantile(allt, 0.99)),
                                      "frames": int(len(allt))}
    return report


# ------------------------------------------------------------------ KDE-AMD protocol


def _fit_fold(training: Sequence[Any]) -> Any:
    """Our model for one protocol fold: fit on the fold's clean training videos, thresholds
    calibrated on the same videos (they gate online adaptation and scale the verdict score,
    which is expressed relative to the thresholds; see docs/model.md)."""
    from lhtstream.detector import calibrate
    from lhtstream.features import track
    from lhtstream.model import NormalityModel

    rows = [(v.type, track(v.measurements, v.obstacles)) for v in training]
    model = NormalityModel.fit(rows)
    calibrate(model, rows)
    return model


def score_measured(model: Any, video: Any, timings: np.ndarray | None = None,
                   offset: int = 0) -> tuple[float, int]:
    """Verdict score of a protocol video (measured rows, perhaps with noisy X/Y) through a
    fresh pipeline's `process_measured`; per-frame µs go to ``timings[offset:]``."""
    from lhtstream.pipeline import StreamPipeline

    pipe = StreamPipeline(STREAM, model=model)
    pipe.start_video(video.name, video.type, None)
    header = monitor_header(video.name, video.type)
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
    from lhtstream import features as F
    from lhtstream import kdeamd as K

    ours_by_type: dict[int, list] = {}
    kde_by_type: dict[int, list] = {}
    for i, v in enumerate(videos):
        progress(f"protocol: measuring {i + 1}/{len(videos)} Type{v.type}/{v.name}")
        frames = v.load()
        obs = np.asarray(v.obstacle_states(), dtype=np.int64)
        ours_by_type.setdefault(v.type, []).append(
            K.ProtocolVideo(v.type, v.name, F.measure_video(frames), obs, (F.X, F.Y)))
        if baseline:
            kde_by_type.setdefault(v.type, []).append(
                K.ProtocolVideo(v.type, v.name, K.spot_positions(frames), obs))
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

    res = K.run_protocol(usable, ours_factory, seed=seed)
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
    kdeamd_grid = K.KdeAmd()
    kde_costs: list[float] = []
    kde_points: list[float] = []
    kstate = {"done": 0}

    def kde_factory(type_id: int, training: Sequence[Any]) -> Callable[[Any], float]:
        model = K.KdeAmd().fit([v.positions for v in training], [v.obstacles for v in training])
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
    kres = K.run_protocol(usable_kde, kde_factory, seed=seed)
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


# ------------------------------------------------------------------ the whole evaluation


def evaluate(data: str | Path, model: Any, types: list[int] | None = None,
             baseline: bool = True, protocol: bool = True, timelines: bool = False,
             progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Evaluate `model` (a `NormalityModel` or a model file) on a labelled data set.

    Returns the report dict (see the module docstring); with ``timelines`` the
    per-video results (with per-frame alarm levels) are under ``"_results"``
    (not JSON: `run_evaluate` drops it before writing).
    """
    from lhtstream.dataset import Dataset, read_labels
    from lhtstream.model import NormalityModel

    t_start = time.perf_counter()
    if not isinstance(model, NormalityModel):
        model = NormalityModel.load(model)
    labels = read_labels(data)
    if not labels:
        raise EvaluateError(f"{data}: no labels.csv: evaluate needs labelled videos")
    ds = Dataset(data)
    videos = list(ds.videos(types=types))
    if not videos:
        raise EvaluateError(f"{data}: no videos{'' if types is None else f' of types {types}'}")
    unknown = sorted({v.type for v in videos if not model.has_type(v.type)})
    if unknown:
        raise EvaluateError(f"model does not know type(s) {unknown}: train it on them "
                            f"(model types: {model.types.tolist()})")
    if not model.calibrated:
        raise EvaluateError("model has no calibrated detector thresholds: train it with "
                            "`lhtstream train`")
    results: list[VideoResult] = []
    t0 = time.perf_counter()
    for i, v in enumerate(videos):
        progress(f"monitor path: video {i + 1}/{len(videos)} Type{v.type}/{v.name}")
        results.append(score_video(model, v, labels.get((v.type, v.name)), timelines=timelines))
    monitor_s = time.perf_counter() - t0
    report = summarise(results)
    report["monitor_path_seconds"] = monitor_s
    report["data"] = str(data)
    report["model"] = dict(model.training)
    report["video_scores"] = {f"{r.type}/{r.name}": {"kind": r.kind, "score": r.score,
                                                      "anomalous": r.anomalous,
                                                      "raises": r.raises}
                              for r in results}
    if protocol:
        normal = [v for v in videos if (lab := labels.get((v.type, v.name))) is None
                  or lab.kind == "normal"]
        report["kdeamd_protocol"] = kdeamd_protocol(normal, baseline=baseline,
                                                    progress=progress)
    report["seconds"] = time.perf_counter() - t_start
    if timelines:
        report["_results"] = results
    return report


# ------------------------------------------------------------------ output


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable text table."""
    lines = [
        f"videos: {report['videos']} ({report['normal_videos']} normal, "
        f"{report['anomalous_videos']} anomalous)",
        f"auc_videos (verdict score, normal vs anomalous): {_f(report['auc_videos'])}",
        "",
        f"{'anomaly kind':<28}{'videos':>7}{'expected':>16}{'detected':>10}{'any kind':>10}"
        f"{'delay med':>11}{'delay p95':>11}{'auc':>7}",
    ]
    for kind, k in report["per_kind"].items():
        lines.append(
            f"{kind:<28}{k['videos']:>7}{k['expected_alarm_kind'] or '-':>16}"
            f"{_f(k['detected_fraction'], '.2f'):>10}"
            f"{_f(k['detected_any_kind_fraction'], '.2f'):>10}"
            f"{_f(k['delay_frames_median'], '.0f'):>11}{_f(k['delay_frames_p95'], '.0f'):>11}"
            f"{_f(k['auc_vs_normal'], '.3f'):>7}")
    lines += [
        "",
        f"false alarms on normal videos: {report['false_alarms']} in "
        f"{report['footage_hours'] * 3600:.0f} s of footage = "
        f"{_f(report['false_alarms_per_hour'], '.2f')} /hour "
        f"(95% upper bound {_f(report['false_alarms_per_hour_upper95'], '.1f')} /hour)"
        + (f"; by kind {report['false_alarms_by_kind']}" if report["false_alarms_by_kind"]
           else ""),
    ]
    mf = report.get("monitor_frame_us")
    if mf:
        lines.append(f"monitor path per frame (features + model + detector, Python call): "
                     f"median {mf['median']:.1f} µs, p99 {mf['p99']:.1f} µs")
    kp = report.get("kdeamd_protocol")
    if kp and "auc" in kp:
        lines += [
            "",
            f"KDE-AMD protocol ({kp['videos']} normal videos, {kp['types']} types, "
            f"{kp['folds']}, noise variance {kp['noise_variance_px2']} px^2):",
            f"  {'method':<24}{'pooled AUC':>12}{'µs/frame':>10}",
            f"  {'lhtstream (ours)':<24}{_f(kp['auc']):>12}{_f(kp['cost_us'], '.1f'):>10}",
        ]
        if kp.get("auc_baseline") is not None:
            g = kp["baseline"]
            name = f"KDE-AMD {g['rows']}x{g['cols']} lambda={g['lambda']}"
            lines.append(f"  {name:<24}{_f(kp['auc_baseline']):>12}"
                         f"{_f(kp['cost_us_baseline'], '.1f'):>10}")
    elif kp:
        lines.append(f"KDE-AMD protocol skipped: {kp.get('skipped')}")
    lines.append(f"\nwall time: {report['seconds']:.1f} s")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def run_evaluate(args: Any) -> int:
    """`lhtstream evaluate DATA --model MODEL [--types] [--json FILE] [--plots DIR]
    [--no-baseline]`."""
    from lhtstream.cli import parse_types

    plots = getattr(args, "plots", None)
    if plots:
        from lhtstream.plots import require_matplotlib

        require_matplotlib()
    progress = Progress()
    report = evaluate(args.data, args.model, types=parse_types(args.types),
                      baseline=not args.no_baseline, timelines=bool(plots), progress=progress)
    progress.done("evaluate: done")
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(report), indent=1))
        print(f"report written to {args.json}")
    if plots:
        from lhtstream.plots import write_plots

        written = write_plots(report, report.get("_results", []), plots)
        print(f"{len(written)} plot(s) written to {plots}")
    return 0
