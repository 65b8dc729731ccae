"""Training: a data set's normal videos (or a stream's first frames) -> fit -> calibrate.

`fit_dataset` trains from files (`lhtstream train`); `fit_collected` from the
feature rows a self-calibrating stream collected, and `BackgroundFit` runs that
on a thread so the stream's frames keep being handled while it fits.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lhtstream.io.dataset import Dataset, Video, read_labels
from lhtstream.kernels.features import video_features
from lhtstream.model.detector import calibrate
from lhtstream.model.normality import DEFAULT_PHASE_BINS, ModelError, NormalityModel
from lhtstream.service.parallel import ordered_map


def normal_videos(root: str | Path, types: list[int] | None = None) -> Iterator:
    """Videos labelled normal in labels.csv (all videos when there is no labels.csv)."""

    labels = read_labels(root)
    for video in Dataset(root).videos(types=types):
        label = labels.get((video.type, video.name))
        if label is None or label.kind == "normal":
            yield video


def video_rows(video: Video) -> np.ndarray:
    """Feature rows of one data-set video (the batch form of the streaming path)."""

    return video_features(video.load(), video.obstacle_states())


def split_holdout(videos: list, every: int = 4) -> tuple[list, list]:
    """Every `every`-th video of each type is held out for calibration (>= 1 per type
    when a type has at least two videos)."""
    by_type: dict[int, list] = {}
    for v in videos:
        by_type.setdefault(v[0], []).append(v)
    train, held = [], []
    for _t, vs in sorted(by_type.items()):
        if len(vs) < 2:
            train.extend(vs)
            continue
        out = {i for i in range(len(vs)) if i % every == every - 1} or {len(vs) - 1}
        for i, v in enumerate(vs):
            (held if i in out else train).append(v)
    return train, held


def fit_dataset(root: str | Path, types: list[int] | None = None, holdout_every: int = 4,
                phase_bins: int = DEFAULT_PHASE_BINS, fa_per_hour: float = 1.0,
                progress: Callable[[str], None] | None = None,
                workers: int | None = None) -> NormalityModel:
    """Fit on a data set's normal videos and calibrate detector thresholds on held-out ones.

    The videos' features are computed on `workers` processes (default: all cores);
    the result does not depend on it.
    """

    loaded: list[tuple[int, np.ndarray]] = []
    vids = list(normal_videos(root, types))
    if not vids:
        raise ModelError(f"{root}: no normal videos to train on")
    # the videos themselves go to the workers: their metadata was read and checked once,
    # here, not again per video
    for i, rows in enumerate(ordered_map(video_rows, vids, workers)):
        video = vids[i]
        loaded.append((video.type, rows))
        if progress:
            progress(f"features {i + 1}/{len(vids)}: Type{video.type}/{video.name}")
    train, held = split_holdout(loaded, holdout_every)
    if not held:  # one video per type: hold out nothing, calibrate on the training data
        held = train
    if progress:
        progress(f"fitting on {len(train)} videos, calibrating on {len(held)} held out")
    model = NormalityModel.fit(train, phase_bins=phase_bins)
    calibrate(model, held, fa_per_hour=fa_per_hour)
    model.training["heldout_videos"] = len(held)
    model.training["heldout_frames"] = int(sum(len(r) for _, r in held))
    model.training["data"] = str(root)
    return model



# ---------------------------------------------------------------- self-calibration

HOLDOUT_FRACTION = 0.25
"""Share of each collected video's frames (its end) that calibrates the thresholds while
fewer than `WHOLE_HOLDOUT_VIDEOS` videos are collected."""
MIN_SPLIT_FRAMES = 200
"""A collected video shorter than this (frames) only trains."""
WHOLE_HOLDOUT_VIDEOS = 6
"""From this many collected videos on, half of them are held out whole (at least the three
`detector.calibrate` needs to see how normal videos differ from each other)."""


def fit_collected(type_id: int, rows: np.ndarray, starts: list[int],
                  checkpoint: Callable[[], None] | None = None) -> NormalityModel:
    """A model of one type from the feature rows a stream collected (videos begin at
    `starts`). With `WHOLE_HOLDOUT_VIDEOS` or more videos, every other one is held out whole
    and every group can be calibrated; with fewer, each video's first
    75 % trains and its end calibrates, and the groups whose normal level differs between
    videos are not judged (`detector.calibrate(population=False)`): one video cannot show how
    much another may differ. `checkpoint` is called between stages; it raises to stop
    the fit (`BackgroundFit.cancel`)."""
    bounds = list(starts) + [len(rows)]
    segments = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    usable = [seg for seg in segments if len(seg) >= MIN_SPLIT_FRAMES]
    train, held = [], []
    whole = len(usable) >= WHOLE_HOLDOUT_VIDEOS
    checkpoint = checkpoint or (lambda: None)  # raises to stop a fit between its stages
    checkpoint()
    if whole:
        train = [(type_id, seg) for seg in usable[0::2]]
        held = [(type_id, seg) for seg in usable[1::2]]
    else:
        for seg in segments:
            if len(seg) < MIN_SPLIT_FRAMES:
                train.append((type_id, seg))
                continue
            cut = int(len(seg) * (1.0 - HOLDOUT_FRACTION))
            train.append((type_id, seg[:cut]))
            held.append((type_id, seg[cut:]))
    model = NormalityModel.fit(train)
    checkpoint()
    calibrate(model, held or train, population=whole)
    model.training["self_calibrated"] = True
    model.training["videos"] = len(segments)
    model.training["frames"] = int(len(rows))
    model.training["heldout"] = (f"{len(held)} whole video(s)" if whole
                                 else "the last quarter of each video")
    return model


GIL_SWITCH_S = 1e-4
"""Python's thread switch interval while a background fit runs (s; default 5e-3): the
frame loop waiting for the interpreter lock gets it back within ~0.1 ms, not 5 ms."""
_handoff = {"running": 0, "saved": None}
_handoff_lock = threading.Lock()


@contextlib.contextmanager
def _fast_gil_handoff() -> Iterator[None]:
    with _handoff_lock:
        if _handoff["running"] == 0:
            _handoff["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(GIL_SWITCH_S)
        _handoff["running"] += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff["running"] -= 1
            if _handoff["running"] == 0:
                sys.setswitchinterval(_handoff["saved"])


class FitCancelled(Exception):
    """A background fit was stopped before it finished (the process or stream is ending)."""


_running_fits: set[BackgroundFit] = set()
_running_lock = threading.Lock()


class BackgroundFit:
    """`fit_collected` on a thread, then (unless `video_start` is None) the scoring
    state of the current video's rows so far (`rows[video_start:]`), so the stream can
    switch to scoring at once.

    The fit's kernels release the interpreter lock and the switch interval is short
    while it runs, so the thread handling frames is delayed by ~0.1 ms at most.
    `result()` waits for it (re-raising its error) and returns (model, scoring state).

    The thread is not a daemon: a daemon thread still inside a compiled kernel when the
    interpreter finalises aborts the process ("terminate called without an active
    exception"). Python joins it before finalising; `cancel()` (or
    `cancel_background_fits()` at shutdown) makes that join short by stopping the fit at
    its next stage.
    """

    def __init__(self, type_id: int, rows: np.ndarray, starts: list[int],
                 video_start: int | None) -> None:
        self.type = int(type_id)
        self.frames = len(rows)
        self.use_from = 0  # the stream's bookkeeping: from which of the type's videos on
        # the rows are copied: the stream goes on filling its buffer while this fits
        self._args = (self.type, np.array(rows), list(starts), video_start)
        self._result: tuple[NormalityModel, np.ndarray | None] | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fit-Type{self.type}")
        with _running_lock:
            _running_fits.add(self)
        self._thread.start()

    def _run(self) -> None:
        type_id, rows, starts, video_start = self._args
        try:
            with _fast_gil_handoff():
                model = fit_collected(type_id, rows, starts, self._checkpoint)
                state = None
                if video_start is not None:
                    self._checkpoint()
                    state = model.new_state()
                    model.score_rows(type_id, rows[video_start:], state)
                self._result = (model, state)
        except BaseException as exc:  # handed to the frame path by result()
            self._error = exc
        finally:
            with _running_lock:
                _running_fits.discard(self)

    def _checkpoint(self) -> None:
        if self._cancel.is_set():
            raise FitCancelled(f"fit of Type{self.type} cancelled")

    def cancel(self, timeout: float | None = None) -> None:
        """Stop the fit at its next stage and wait for its thread (at most `timeout` s)."""
        self._cancel.set()
        self._thread.join(timeout)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[NormalityModel, np.ndarray | None]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def cancel_background_fits(timeout: float | None = None) -> int:
    """Cancel every background fit of this process and wait for their threads (at most
    `timeout` s each); the number that were running."""
    with _running_lock:
        fits = list(_running_fits)
    for fit in fits:
        fit.cancel(timeout)
    return len(fits)
