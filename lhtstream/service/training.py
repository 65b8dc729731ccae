"""Training from a data set: the normal videos' features -> fit -> calibrate on held-out videos."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lhtstream.io.dataset import Dataset, read_labels
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


def video_rows(video) -> np.ndarray:
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


def _video_rows(item: tuple[str, int, str]) -> np.ndarray:
    root, type_id, name = item
    return video_rows(Dataset(root).video(type_id, name))


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
    items = [(str(root), v.type, v.name) for v in vids]
    for i, rows in enumerate(ordered_map(_video_rows, items, workers)):
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


