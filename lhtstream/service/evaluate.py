"""Offline evaluation through the monitor's own per-frame code path.

`evaluate(data, model)` replays every video of a labelled data set through a
`StreamPipeline` exactly as the monitor does (``start_video``, then the
monitor's per-frame kernel over the video's frames with the header fields the
monitor gets from the wire, in blocks (``process_block``), then
``end_video_events``), and reports against ``labels.csv``:

- ``auc_videos``: ROC AUC of the verdict score, normal vs anomalous videos;
- ``per_kind``: detection (an alarm *raised* between onset and end + 100
  frames; ``detected_fraction`` counts only alarms of the kind
  `detector.ALARM_KIND_FOR_ANOMALY` expects, ``detected_any_kind_fraction``
  any kind) and delays (onset to first such raise, frames); ``family`` is
  ``simulator`` or the unseen-fault family of an `io.perturb` perturbation;
  ramped faults (synth ``--ramp-frames``) also get the share alarmed before
  the ramp was complete;
- ``false_alarms_per_hour``: raises on normal videos per hour of footage
  (1000 frames = 1 s), with a one-sided 95 % Poisson upper bound;
- ``kdeamd_protocol``: the published KDE-AMD protocol on the normal videos
  (leave-one-out within a type, clean vs N(0, variance) position noise, 0.02 px^2
  as published, or each of ``noise_variances``) for our model (measure -> noise
  on X/Y -> ``process_measured`` per frame), KDE-AMD as published and the
  paper-faithful KDE-AMD, on the same folds and the same noise
  (`lhtstream.service.kdeamd_protocol`).

Each video gets a fresh pipeline (a monitor started with the model file on
that video): scores do not depend on the order of videos or on the selection.
Units: frames (1 frame = 1 ms), hours of footage, costs in µs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.stats import poisson_upper, roc_auc
from lhtstream.io.dataset import Dataset, read_labels
from lhtstream.io.events import Alarm, Event, Verdict
from lhtstream.io.perturb import PERTURBATIONS, read_manifest
from lhtstream.model.detector import ALARM_KIND_FOR_ANOMALY, FRAMES_PER_HOUR
from lhtstream.model.kdeamd import NOISE_VARIANCE
from lhtstream.model.normality import NormalityModel
from lhtstream.service.kdeamd_protocol import kdeamd_protocol, noise_levels
from lhtstream.service.parallel import ordered_map, resolve_workers
from lhtstream.service.pipeline import StreamPipeline, offline_header

#: An alarm counts as a detection when raised in [onset, end + DETECTION_SLACK] frames.
DETECTION_SLACK = 100
STREAM = "evaluate"
#: Per-frame timings kept for the cost medians (a sample is enough).
_MAX_TIMINGS = 200_000
#: KDE-AMD frames timed per fitted model (its per-frame cost), and models timed.
_KDE_TIMED_MOVES = 1000
_KDE_TIMED_MODELS = 8


class EvaluateError(LhtstreamError):
    """The data set or model cannot be evaluated (no labels, no videos, unknown types)."""


# ------------------------------------------------------------------ progress




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
    frame_us: float | None = None  # pipeline time per frame over the video, µs
    level: np.ndarray | None = None  # per-frame max smoothed score / raise threshold
    ramp_frames: int = 0  # the fault's magnitude is complete at onset + ramp_frames - 1


def run_video(pipeline: Any, name: str, type_id: int, frames: np.ndarray,
              obstacles: np.ndarray, metadata: dict | None = None, *,
              timelines: bool = False, timings: bool = True,
              ) -> tuple[Verdict, list[Alarm], float | None, np.ndarray | None]:
    """Drive `pipeline` over one video's frames as the monitor does, in blocks
    (`StreamPipeline.process_block`: the monitor's kernel, one call per alarm change).

    Returns (verdict, alarm events, µs per frame or None, per-frame level or None).
    ``frames`` is (n, rows, cols) uint16; ``obstacles`` (n,) of 0/1/2.
    """
    events: list[Event] = list(pipeline.start_video(name, type_id, metadata))
    header = offline_header(STREAM, name, type_id)
    n = frames.shape[0]
    level = np.full(n, np.nan) if timelines else None
    t0 = time.perf_counter_ns()
    events.extend(pipeline.process_block(frames, obstacles, header, level=level))
    us = (time.perf_counter_ns() - t0) / 1000.0 / max(n, 1) if timings else None
    events.extend(pipeline.end_video_events())  # clears, then the verdict
    verdict = events.pop()
    assert isinstance(verdict, Verdict)  # the video was started above
    return verdict, [e for e in events if isinstance(e, Alarm)], us, level


def score_video(model: Any, video: Any, label: Any = None, *, timelines: bool = False,
                adapt: bool = True) -> VideoResult:
    """One data-set video through a fresh monitor pipeline with `model` (online adaptation
    on, as in the monitor, unless `adapt` is False)."""

    frames = video.load()
    pipe = StreamPipeline(STREAM, model=model, adapt=adapt)
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
        ramp_frames=0 if label is None else int(label.ramp_frames),
    )


_worker: dict[str, Any] = {}  # what a worker process (or this one) scores videos with


def _start_worker(model: NormalityModel | str, data: str, timelines: bool) -> None:
    _worker["model"] = model if isinstance(model, NormalityModel) else NormalityModel.load(model)
    _worker["data"] = Dataset(data)
    _worker["timelines"] = timelines


def _score_item(item: tuple[int, str, Any]) -> VideoResult:
    type_id, name, label = item
    return score_video(_worker["model"], _worker["data"].video(type_id, name), label,
                       timelines=_worker["timelines"])


# ------------------------------------------------------------------ statistics


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


def _raised_in(result: VideoResult, onset: int | None, end: int | None) -> bool:
    """Whether `result` raised an alarm in [onset, end + DETECTION_SLACK]."""
    last = (end if end is not None else result.frames - 1) + DETECTION_SLACK
    return any(onset is not None and onset <= f <= last for f, _ in result.raises)


def summarise(results: Sequence[VideoResult],
              manifest: dict[tuple[int, str], dict[str, str]] | None = None) -> dict[str, Any]:
    """The monitor-path metrics (auc_videos, per_kind, false alarms, verdicts, cost).

    ``manifest`` (`lhtstream perturb`'s, as `read_manifest` gives it) names each
    perturbed copy's normal source in the same results; per kind it adds the share
    alarmed among copies whose source raised nothing in the same window, so a false
    alarm the source already had is not counted as detecting the perturbation, and
    their delay from the first frame the perturbation changed (``first_changed_frame``).
    """
    by_key = {(r.type, r.name): r for r in results}
    manifest = manifest or {}

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
            "delay_any_kind_p95": _p95(anyk),
            "family": PERTURBATIONS[kind].family if kind in PERTURBATIONS else "simulator",
            "types": len({r.type for r in rs}),
            "types_missed": sorted({r.type for r, d in zip(rs, dets, strict=True)
                                    if d["any"] is None}),
            "alarm_kinds_in_window": dict(sorted(raised.items())),
            "alarms_before_onset": int(sum(d["before_onset"] for d in dets)),
            "verdict_anomalous_fraction": _frac(sum(r.anomalous for r in rs), len(rs)),
            "auc_vs_normal": roc_auc(neg, [r.score for r in rs]),
        }
        rows = [manifest.get((r.type, r.name), {}) for r in rs]
        quiet = [(r, d, row) for r, d, row in zip(rs, dets, rows, strict=True)
                 if (src := by_key.get((r.type, row.get("source", "")))) is not None
                 and not _raised_in(src, r.onset, r.end)]
        if quiet:
            delays = [d["any"] for _r, d, _row in quiet if d["any"] is not None]
            per_kind[kind]["quiet_source_videos"] = len(quiet)
            per_kind[kind]["alarmed_quiet_source_fraction"] = _frac(len(delays), len(quiet))
            per_kind[kind]["delay_quiet_source_median"] = _median(delays)
            per_kind[kind]["delay_quiet_source_p95"] = _p95(delays)
        if quiet and all("first_changed_frame" in row for _r, _d, row in quiet):
            # until its first changed frame a copy shows what its source shows
            firsts = [int(row["first_changed_frame"]) for _r, _d, row in quiet]
            from_change = [r.onset + d["any"] - first
                           for (r, d, _row), first in zip(quiet, firsts, strict=True)
                           if first >= 0 and d["any"] is not None]
            per_kind[kind]["unchanged_quiet_source_videos"] = sum(f < 0 for f in firsts)
            per_kind[kind]["delay_first_change_median"] = _median(from_change)
            per_kind[kind]["delay_first_change_p95"] = _p95(from_change)
        ramped = [(r, d) for r, d in zip(rs, dets, strict=True) if r.ramp_frames > 0]
        if ramped:
            # a slowly developing fault must be alarmed before it is complete
            early = [d["any"] for r, d in ramped
                     if d["any"] is not None and d["any"] < r.ramp_frames]
            per_kind[kind]["ramp_frames"] = int(np.median([r.ramp_frames for r, _ in ramped]))
            per_kind[kind]["alarmed_before_ramp_end_fraction"] = _frac(len(early), len(ramped))
            per_kind[kind]["delay_before_ramp_end_median"] = _median(early)
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
    timed = [r for r in results if r.frame_us is not None]
    if timed:
        per_video = np.array([r.frame_us for r in timed])
        report["monitor_frame_us"] = {"median": float(np.median(per_video)),
                                      "p99": float(np.quantile(per_video, 0.99)),
                                      "frames": int(sum(r.frames for r in timed))}
    return report


# ------------------------------------------------------------------ KDE-AMD protocol








# ------------------------------------------------------------------ the whole evaluation


def evaluate(data: str | Path, model: Any, types: list[int] | None = None,
             baseline: bool = True, protocol: bool = True, timelines: bool = False,
             progress: Callable[[str], None] = _quiet,
             noise_variances: Sequence[float] = (NOISE_VARIANCE,),
             workers: int | None = None) -> dict[str, Any]:
    """Evaluate `model` (a `NormalityModel` or a model file) on a labelled data set.

    Returns the report dict (see the module docstring); with ``timelines`` the
    per-video results (with per-frame alarm levels) are under ``"_results"``
    (not JSON: `run_evaluate` drops it before writing). The monitor path scores
    the videos on `workers` processes (default: all cores); every video gets a
    fresh pipeline either way, so the report does not depend on it.
    """

    t_start = time.perf_counter()
    noise_variances = noise_levels(noise_variances)  # fail before the long monitor path
    workers = resolve_workers(workers)
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
    items = [(v.type, v.name, labels.get((v.type, v.name))) for v in videos]
    with tempfile.TemporaryDirectory(prefix="lhtstream-evaluate-") as tmp:
        # worker processes load the model from a file (this process uses the object)
        shared = model if workers == 1 else str(model.save(Path(tmp) / "model.npz"))
        for i, r in enumerate(ordered_map(_score_item, items, workers, _start_worker,
                                          (shared, str(data), timelines))):
            results.append(r)
            progress(f"monitor path: video {i + 1}/{len(videos)} Type{r.type}/{r.name}"
                     f" ({workers} worker{'s' if workers > 1 else ''})")
    monitor_s = time.perf_counter() - t0
    report = summarise(results, read_manifest(ds.root))
    report["monitor_path_seconds"] = monitor_s
    report["monitor_path_workers"] = workers
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
                                                    variances=noise_variances,
                                                    progress=progress)
    report["seconds"] = time.perf_counter() - t_start
    if timelines:
        report["_results"] = results
    return report
