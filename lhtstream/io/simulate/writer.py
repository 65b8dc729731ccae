"""Write simulated videos in the published format, plus labels.csv and truth sidecars."""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.dataset import Label, load_metadata, read_labels, save_metadata, write_labels
from lhtstream.io.simulate.anomalies import ANOMALY_KINDS, SPAN_MIN
from lhtstream.io.simulate.video import simulate_video

# Real per-type video counts (seed document).
REAL_COUNTS = {t: 109 for t in range(1, 10)}
REAL_COUNTS.update({t: 114 for t in range(10, 18)})
REAL_COUNTS.update({18: 113, 19: 123, 28: 118})
REAL_COUNTS.update({t: 125 for t in range(20, 28)})
REAL_COUNTS.update({t: 122 for t in range(29, 37)})
DEFAULT_VIDEOS_PER_TYPE = 2
DEFAULT_FRAMES = 2000
FULL_FRAMES = (14000, 16000)  # --full: per-video length uniform in this range (~15,000)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: same arguments -> byte-identical files


class SynthError(LhtstreamError):
    """Bad synthesis arguments."""


def write_npz(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], compress: bool = True
) -> None:
    """An ``np.load``-compatible npz with fixed zip timestamps (deterministic bytes), atomic."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=1 if compress else None) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def video_seed(seed: int, type_id: int, index: int) -> int:
    """Seed of video ``index`` (1-based) of a type: independent of every other video."""
    return int(np.random.SeedSequence([seed, type_id, index]).generate_state(2, np.uint64)[0] >> 1)


def synthesize(
    out: str | os.PathLike,
    types: list[int] | None = None,
    videos_per_type: int | None = None,
    frames: int | None = None,
    anomaly_rate: float = 0.0,
    anomalies: list[str] | None = None,
    seed: int = 0,
    full: bool = False,
    progress: bool | None = False,
    ramp_frames: int = 0,
) -> str:
    """Write a synthetic data set under ``out``; returns a one-line summary.

    Default: all 36 types x 2 videos x 2000 frames. ``full``: the real per-type counts
    x ~15,000 frames (~63 M frames; warns first). floor(n x ``anomaly_rate``) videos
    per type are anomalous, spread evenly (rate 0.5: every second video); their kinds
    cycle deterministically through ``anomalies`` (default all kinds) across the run,
    so enough anomalous videos cover every kind.
    Videos are named 0001.. per type (the real set numbers across the set).
    """
    out = Path(out)
    types = list(range(1, 37)) if types is None else sorted(set(int(t) for t in types))
    if not types or min(types) < 1 or max(types) > 36:
        raise SynthError(f"types must be within 1..36, got {types}")
    kinds = list(ANOMALY_KINDS) if anomalies is None else list(anomalies)
    bad = [k for k in kinds if k not in ANOMALY_KINDS]
    if bad or not kinds:
        raise SynthError(
            f"unknown anomaly kind(s) {', '.join(bad) or '(none)'}; "
            f"kinds: {', '.join(ANOMALY_KINDS)}"
        )
    if not 0.0 <= anomaly_rate <= 1.0:
        raise SynthError(f"anomaly rate must be within 0..1, got {anomaly_rate}")
    if videos_per_type is not None and videos_per_type < 1:
        raise SynthError(f"videos per type must be >= 1, got {videos_per_type}")
    if frames is not None and frames < 1:
        raise SynthError(f"frames must be >= 1, got {frames}")
    if ramp_frames < 0:
        raise SynthError(f"ramp frames must be >= 0, got {ramp_frames}")
    if ramp_frames and anomaly_rate > 0:
        shortest = frames or (FULL_FRAMES[0] if full else DEFAULT_FRAMES)
        if shortest < ramp_frames + 2 * SPAN_MIN:
            raise SynthError(
                f"a {ramp_frames}-frame ramp needs videos of at least "
                f"{ramp_frames + 2 * SPAN_MIN} frames (--frames), got {shortest}"
            )
    counts = {
        t: (videos_per_type or (REAL_COUNTS[t] if full else DEFAULT_VIDEOS_PER_TYPE)) for t in types
    }
    n_videos = sum(counts.values())
    if full:
        est_frames = n_videos * (frames or sum(FULL_FRAMES) // 2)
        print(
            f"lhtstream synth --full: {n_videos} videos, ~{est_frames / 1e6:.0f} M frames, "
            f"~{est_frames * 400 * 2 / 1e9 * 0.1:.0f}-{est_frames * 400 * 2 / 1e9:.0f} GB on disk "
            "(compressed .. raw); this takes hours",
            file=sys.stderr,
        )
    out.mkdir(parents=True, exist_ok=True)
    labels = {k: v for k, v in read_labels(out).items() if k[0] not in counts}
    t0 = time.perf_counter()
    total_frames = 0
    done = 0
    n_anom = 0
    for type_id in types:
        tdir = out / f"Type{type_id}"
        truth_dir = out / "truth" / f"Type{type_id}"
        tdir.mkdir(exist_ok=True)
        truth_dir.mkdir(parents=True, exist_ok=True)
        meta_path = tdir / "metadata.pkl"
        metadata = load_metadata(meta_path) if meta_path.exists() else {}
        for index in range(1, counts[type_id] + 1):
            name = f"{index:04d}"
            vseed = video_seed(seed, type_id, index)
            n_frames = frames or (
                int(np.random.default_rng([seed, type_id, index, 0xF0]).integers(*FULL_FRAMES))
                if full
                else DEFAULT_FRAMES
            )
            kind = None
            # evenly spread quota: exactly floor(n * rate) anomalous videos per type
            if int(index * anomaly_rate + 1e-9) > int((index - 1) * anomaly_rate + 1e-9):
                kind = kinds[n_anom % len(kinds)]
                n_anom += 1
            sim = simulate_video(type_id, vseed, n_frames, kind, ramp_frames=ramp_frames)
            write_npz(tdir / f"{name}.npz", {"image": sim.image})
            write_npz(truth_dir / f"{name}.npz", sim.truth)
            metadata[name] = sim.metadata
            k, onset, end, mag = sim.label
            ramp = sim.anomaly.ramp_frames if sim.anomaly is not None else 0
            labels[(type_id, name)] = Label(type_id, name, k, onset, end, mag, ramp)
            total_frames += n_frames
            done += 1
            if progress:
                rate = total_frames / max(time.perf_counter() - t0, 1e-9)
                print(
                    f"\rsynth: {done}/{n_videos} videos, {total_frames} frames, "
                    f"{rate:,.0f} frames/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        save_metadata(meta_path, metadata)
    write_labels(out, labels.values())
    if progress:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - t0
    return (
        f"wrote {done} videos ({n_anom} anomalous), {total_frames} frames in {len(types)} type(s) "
        f"to {out} in {elapsed:.1f} s ({total_frames / max(elapsed, 1e-9):,.0f} frames/s)"
    )
