"""Unseen-fault catalogue: frame-level perturbations painted on finished videos.

The simulator's faults (`lhtstream.simulate.anomalies`) act in its physics; a
real line shows faults that no physics of ours produces. This catalogue is
kept apart on purpose: every perturbation takes a *written* difference video
(uint16, (frames, rows, cols)) and changes it from an onset frame on, the way
a fault after the laser would: in the optics, stray light and reflections,
the sensor, the camera's alignment or its frame timing. They work on any
data set in the published format, real files included, and know nothing of
the simulator or the model.

Magnitudes are fixed a priori as a plausible fault of each kind (what they
mean is in `Perturbation.meaning`); they are NOT tuned to what the detector
catches. Use the catalogue to measure generalisation, never to fit
thresholds: other perturbations will be tried.

Units: pixels (px) of the ROI, frames (1 frame = 1 ms), camera counts.
"""

from __future__ import annotations

import csv
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.dataset import Dataset, Label, read_labels, save_metadata, write_labels
from lhtstream.io.simulate.writer import write_npz

MAX_COUNTS = 1024  # camera range 0..1024

# A perturbation: (frames after onset as float32 (m, rows, cols), magnitude, rng, context)
# -> perturbed float frames; timing perturbations instead return a source-frame index map.


@dataclass(frozen=True)
class Perturbation:
    """One kind of unseen fault: its family, default magnitude and what the magnitude means."""

    name: str
    family: str  # optics, stray_light, sensor, alignment, timing
    magnitude: float
    meaning: str
    apply: Callable[..., np.ndarray]
    timing: bool = False  # True: `apply` returns source frame indices (the length may change)


# ------------------------------------------------------------------ helpers


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis, energy kept for interior pixels (zero padding)."""
    i = np.arange(n)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    radius = np.exp(-0.5 * ((np.arange(-n, n + 1)) / sigma) ** 2).sum()
    return (k / radius).astype(np.float32)


def _warp_matrix(rows: int, cols: int, src_r: np.ndarray, src_c: np.ndarray) -> np.ndarray:
    """(P, P) bilinear sampling: output pixel p takes the image at (src_r[p], src_c[p]);
    samples outside the ROI read 0 (the camera sees nothing there)."""
    p = rows * cols
    m = np.zeros((p, p), dtype=np.float32)
    r0 = np.floor(src_r).astype(np.int64)
    c0 = np.floor(src_c).astype(np.int64)
    fr = (src_r - r0).astype(np.float32)
    fc = (src_c - c0).astype(np.float32)
    out = np.arange(p)
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                      (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        np.add.at(m, (out[ok], rr[ok] * cols + cc[ok]), w[ok])
    return m


def _apply_matrix(f: np.ndarray, m: np.ndarray) -> np.ndarray:
    n, rows, cols = f.shape
    return (f.reshape(n, rows * cols) @ m.T).reshape(n, rows, cols)


def _translate(f: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Bilinear translation of each frame by (dy[t], dx[t]) px (content moves by +d)."""
    n, rows, cols = f.shape
    out = np.empty_like(f)
    pad = np.zeros((n, rows + 4, cols + 4), dtype=f.dtype)
    pad[:, 2:-2, 2:-2] = f
    iy, ix = np.floor(dy).astype(np.int64), np.floor(dx).astype(np.int64)
    if np.any(np.abs(iy) > 1) or np.any(np.abs(ix) > 1):
        raise ValueError("translation beyond 1 px per axis is not supported")
    ay, ax = (dy - iy).astype(np.float32), (dx - ix).astype(np.float32)
    for t in range(n):
        # out[r, c] = f[r - dy, c - dx]
        y0, x0 = 2 - iy[t], 2 - ix[t]
        a = pad[t, y0:y0 + rows, x0:x0 + cols]
        b = pad[t, y0 - 1:y0 - 1 + rows, x0:x0 + cols]
        c = pad[t, y0:y0 + rows, x0 - 1:x0 - 1 + cols]
        d = pad[t, y0 - 1:y0 - 1 + rows, x0 - 1:x0 - 1 + cols]
        wy, wx = ay[t], ax[t]
        out[t] = (1 - wy) * (1 - wx) * a + wy * (1 - wx) * b + (1 - wy) * wx * c + wy * wx * d
    return out


def _raw_change(f: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Add a change `delta` of the *raw* frames to difference frames: a published pixel is
    max(raw[t] - raw[t-1], 0), so where it was clipped at 0 the raw difference is taken as
    0 (cold background: its raw difference is noise around 0)."""
    return np.maximum(f + delta, 0.0)


def _central_point(rng: np.random.Generator, rows: int, cols: int) -> tuple[float, float]:
    """A random point in the central 60 % of the ROI (where the scan pattern runs)."""
    return (float(rng.uniform(0.2, 0.8) * (rows - 1)), float(rng.uniform(0.2, 0.8) * (cols - 1)))


# ------------------------------------------------------------------ optics


def _blur(f, m, rng, ctx):
    _, rows, cols = f.shape
    kr, kc = _gauss_matrix(rows, m), _gauss_matrix(cols, m)
    return np.einsum("ij,tjk,lk->til", kr, f, kc, optimize=True)


def _vignetting(f, m, rng, ctx):
    _, rows, cols = f.shape
    r = np.arange(rows)[:, None] - (rows - 1) / 2
    c = np.arange(cols)[None, :] - (cols - 1) / 2
    rho2 = (r * r + c * c) / ((rows - 1) ** 2 / 4 + (cols - 1) ** 2 / 4)
    return f * (1.0 - m * rho2).astype(np.float32)


def _smudge(f, m, rng, ctx):
    _, rows, cols = f.shape
    cr, cc = _central_point(rng, rows, cols)
    r = np.arange(rows)[:, None] - cr
    c = np.arange(cols)[None, :] - cc
    return f * (1.0 - m * np.exp(-(r * r + c * c) / (2 * 3.0**2))).astype(np.float32)


# ------------------------------------------------------------------ stray light, reflections

GHOST_OFFSET = (3, 4)  # rows, cols: a double reflection in the protective window


def _ghost_copy(f, m):
    out = f.copy()
    dr, dc = GHOST_OFFSET
    out[:, dr:, dc:] += m * f[:, :-dr, :-dc]
    return out


def _ghost(f, m, rng, ctx):
    return _ghost_copy(f, m)


def _ghost_alternate(f, m, rng, ctx):
    out = f.copy()
    out[::2] = _ghost_copy(f[::2], m)
    return out


def _flicker(f, m, rng, ctx):
    """A lamp flickering at 120 Hz lights a broad patch (sigma 5 px) of the raw image."""
    n, rows, cols = f.shape
    cr, cc = _central_point(rng, rows, cols)
    r = np.arange(rows)[:, None] - cr
    c = np.arange(cols)[None, :] - cc
    patch = np.exp(-(r * r + c * c) / (2 * 5.0**2)).astype(np.float32)
    t = np.arange(-1, n) + ctx["onset"]
    glow = 0.5 * m * (1.0 + np.sin(2 * math.pi * 120.0 * t / 1000.0 + rng.uniform(0, 2 * math.pi)))
    delta = np.diff(glow).astype(np.float32)
    return _raw_change(f, delta[:, None, None] * patch[None])


def _spatter(f, m, rng, ctx):
    """Hot particles thrown off the melt: on a share `m` of frames a short bright streak
    (3 px long, sigma 0.7 px, peak 100-400 counts) somewhere in the ROI."""
    n, rows, cols = f.shape
    out = f.copy()
    rr = np.arange(rows)[:, None]
    cc = np.arange(cols)[None, :]
    for t in np.flatnonzero(rng.random(n) < m):
        r0, c0 = rng.uniform(0, rows - 1), rng.uniform(0, cols - 1)
        ang = rng.uniform(0, 2 * math.pi)
        peak = rng.uniform(100, 400)
        for s in (-1.0, 0.0, 1.0):
            r, c = r0 + s * math.sin(ang), c0 + s * math.cos(ang)
            out[t] += (peak / 3) * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * 0.7**2))
    return out


# ------------------------------------------------------------------ sensor


def _hot_pixels(f, m, rng, ctx):
    """`m` blinking (random-telegraph) pixels: each frame each shows a 30-150 count spike
    with probability 0.3."""
    n, rows, cols = f.shape
    k = max(1, round(m))
    idx = rng.choice(rows * cols, size=k, replace=False)
    out = f.reshape(n, rows * cols).copy()
    spikes = np.where(rng.random((n, k)) < 0.3, rng.uniform(30, 150, (n, k)), 0.0)
    out[:, idx] = np.maximum(out[:, idx], spikes.astype(np.float32))
    return out.reshape(n, rows, cols)


def _dead_pixels(f, m, rng, ctx):
    """An `m` x `m` block of dead pixels (read 0) where the pattern runs."""
    _, rows, cols = f.shape
    k = max(1, round(m))
    cr, cc = _central_point(rng, rows, cols)
    r0, c0 = int(round(cr)) - k // 2, int(round(cc)) - k // 2
    out = f.copy()
    out[:, max(r0, 0):r0 + k, max(c0, 0):c0 + k] = 0.0
    return out


def _row_noise(f, m, rng, ctx):
    """Readout banding: each raw row gets an offset N(0, m counts) per frame."""
    n, rows, _ = f.shape
    off = rng.normal(0.0, m, (n + 1, rows)).astype(np.float32)
    return _raw_change(f, np.diff(off, axis=0)[:, :, None])


def _gain_drift(f, m, rng, ctx):
    """Sensor gain drifting linearly by `m` (relative) over 3000 frames, then holding."""
    n = f.shape[0]
    g = 1.0 + m * np.minimum(1.0, (np.arange(n) + 1.0) / 3000.0)
    return f * g.astype(np.float32)[:, None, None]


def _clipping(f, m, rng, ctx):
    """The camera saturates at `m` x the video's median frame peak before the onset."""
    return np.minimum(f, m * ctx["median_peak"])


# ------------------------------------------------------------------ alignment


def _shift(f, m, rng, ctx):
    n = f.shape[0]
    return _translate(f, np.full(n, m), np.full(n, m))


def _rotation(f, m, rng, ctx):
    _, rows, cols = f.shape
    a = math.radians(m)
    r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                       indexing="ij")
    yc, xc = (rows - 1) / 2, (cols - 1) / 2
    # output pixel (r, c) looks at the source rotated back by -a
    sr = yc + (r - yc) * math.cos(a) - (c - xc) * math.sin(a)
    sc = xc + (r - yc) * math.sin(a) + (c - xc) * math.cos(a)
    return _apply_matrix(f, _warp_matrix(rows, cols, sr.ravel(), sc.ravel()))


def _camera_creep(f, m, rng, ctx):
    """The camera mount creeps: the image slides diagonally by `m` px over 5000 frames."""
    n = f.shape[0]
    s = (m / math.sqrt(2.0)) * np.minimum(1.0, (np.arange(n) + 1.0) / 5000.0)
    return _translate(f, s, s)


# ------------------------------------------------------------------ timing (index maps)


def _dropped(n, m, rng, ctx):
    return np.flatnonzero(rng.random(n) >= m)


def _duplicated(n, m, rng, ctx):
    reps = np.where(rng.random(n) < m, 2, 1)
    return np.repeat(np.arange(n), reps)


def _swapped(n, m, rng, ctx):
    idx = np.arange(n)
    t = 0
    draws = rng.random(n)
    while t < n - 1:
        if draws[t] < m:
            idx[t], idx[t + 1] = idx[t + 1], idx[t]
            t += 2
        else:
            t += 1
    return idx


def _exposure_jitter(f, m, rng, ctx):
    """Exposure start jitters by up to `m` frames: each frame blends into the next one."""
    w = rng.uniform(0.0, m, f.shape[0]).astype(np.float32)[:, None, None]
    nxt = np.concatenate([f[1:], f[-1:]])
    return (1 - w) * f + w * nxt


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in (
    Perturbation("blur", "optics", 1.0, "Gaussian blur sigma, px (lens out of focus, dirty window)",
                 _blur),
    Perturbation("vignetting", "optics", 0.5,
                 "relative light loss at the ROI corners, growing with radius^2", _vignetting),
    Perturbation("smudge", "optics", 0.6,
                 "attenuation at the centre of a 3-px smudge on the window", _smudge),
    Perturbation("ghost", "stray_light", 0.3,
                 "relative intensity of a reflection displaced (3, 4) px, every frame", _ghost),
    Perturbation("ghost_alternate", "stray_light", 0.3,
                 "the same reflection on every second frame only", _ghost_alternate),
    Perturbation("flicker", "stray_light", 40.0,
                 "raw counts of a lamp flickering at 120 Hz on a 5-px patch", _flicker),
    Perturbation("spatter", "stray_light", 0.03, "share of frames with a hot-particle streak",
                 _spatter),
    Perturbation("hot_pixels", "sensor", 4, "blinking pixels (30-150 counts, 30 % of frames)",
                 _hot_pixels),
    Perturbation("dead_pixels", "sensor", 3, "side of a block of dead pixels (read 0), px",
                 _dead_pixels),
    Perturbation("row_noise", "sensor", 3.0, "raw row offset std per frame, counts", _row_noise),
    Perturbation("gain_drift", "sensor", -0.3, "relative gain change, linear over 3000 frames",
                 _gain_drift),
    Perturbation("clipping", "sensor", 0.5, "saturation level / the video's median frame peak",
                 _clipping),
    Perturbation("shift", "alignment", 0.5, "sudden translation, px per axis (bilinear)", _shift),
    Perturbation("rotation", "alignment", 3.0, "rotation about the ROI centre, degrees",
                 _rotation),
    Perturbation("camera_creep", "alignment", 1.0, "diagonal slide over 5000 frames, px",
                 _camera_creep),
    Perturbation("dropped_frames", "timing", 0.02, "share of frames never written",
                 _dropped, timing=True),
    Perturbation("duplicated_frames", "timing", 0.02, "share of frames written twice",
                 _duplicated, timing=True),
    Perturbation("swapped_frames", "timing", 0.02, "share of frames swapped with the next",
                 _swapped, timing=True),
    Perturbation("exposure_jitter", "timing", 0.5,
                 "largest exposure delay, frames (a frame blends into the next)",
                 _exposure_jitter),
)}


# ------------------------------------------------------------------ one video


class PerturbError(LhtstreamError, ValueError):
    """Bad perturbation arguments (unknown kind, onset outside the video)."""


def perturb_video(image: np.ndarray, kind: str, onset: int, rng: np.random.Generator,
                  magnitude: float | None = None,
                  obstacles: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply perturbation `kind` to frames ``onset..`` of a difference video.

    ``image``: (frames, rows, cols) uint16, not modified. Returns the perturbed video
    (uint16, rounded, clipped to 0..1024) and, for timing perturbations that change the
    number of frames, the obstacle states (frames,) of the new frames (else ``obstacles``
    unchanged). Frames before ``onset`` are byte-identical to the input.
    """
    p = PERTURBATIONS.get(kind)
    if p is None:
        raise PerturbError(f"unknown perturbation {kind!r}; kinds: {', '.join(PERTURBATIONS)}")
    n = image.shape[0]
    if not 0 < onset < n:
        raise PerturbError(f"onset {onset} is outside 1..{n - 1}")
    m = p.magnitude if magnitude is None else float(magnitude)
    if p.timing:
        idx = np.concatenate([np.arange(onset), onset + p.apply(n - onset, m, rng, {})])
        obs = None if obstacles is None else np.asarray(obstacles)[idx]
        return np.ascontiguousarray(image[idx]), obs
    peaks = image[:onset].reshape(onset, -1).max(axis=1)
    ctx = {"onset": onset, "median_peak": float(np.median(peaks))}
    after = p.apply(image[onset:].astype(np.float32), m, rng, ctx)
    out = image.copy()
    out[onset:] = np.clip(np.rint(after), 0, MAX_COUNTS).astype(np.uint16)
    return out, obstacles


def first_change(image: np.ndarray, perturbed: np.ndarray, onset: int) -> int:
    """The first frame from ``onset`` on where ``perturbed`` differs from its source
    ``image`` at the same index (-1: none does). A sporadic fault (dropped frames,
    spatter) or one the spot must reach (dead pixels) shows in the footage only from
    here: no detector can react earlier."""
    n = min(image.shape[0], perturbed.shape[0])
    at = np.flatnonzero((perturbed[onset:n] != image[onset:n]).any(axis=(1, 2)))
    return int(onset + at[0]) if len(at) else -1


def windows_from_states(states: np.ndarray) -> list[tuple[int, int]]:
    """Obstacle windows (inclusive first, last frame of state n = 1, 2) of a state series."""
    out = []
    for n in (1, 2):
        at = np.flatnonzero(np.asarray(states) == n)
        if len(at):
            out.append((int(at[0]), int(at[-1])))
    return out


# ------------------------------------------------------------------ a data set

ONSET_RANGE = (0.2, 0.55)  # onset drawn uniformly in this fraction of the video
MANIFEST = "perturbations.csv"
MANIFEST_COLUMNS = ("type", "video", "source", "kind", "family", "onset_frame", "end_frame",
                    "magnitude", "frames", "first_changed_frame")


def perturbation_rng(seed: int, type_id: int, source: str, kind: str) -> np.random.Generator:
    """The random stream of one (source video, kind): independent of the other kinds chosen."""
    return np.random.default_rng([int(seed), int(type_id), zlib.crc32(source.encode()),
                                  zlib.crc32(kind.encode())])


def perturb_dataset(src: str | os.PathLike, out: str | os.PathLike,
                    kinds: list[str] | None = None, types: list[int] | None = None,
                    videos: list[str] | None = None, seed: int = 0, scale: float = 1.0,
                    progress: Callable[[str], None] | None = None) -> str:
    """Write to `out` a copy of `src`'s normal videos plus, for each of them and each kind,
    a perturbed copy (onset drawn in 20-55 % of the video, perturbed to its end).

    `out` gets the published format plus ``labels.csv`` (kind = perturbation name, onset,
    end = last frame, magnitude) and ``perturbations.csv`` (which source each copy came
    from). Normal copies keep their names; perturbed copies are numbered after the
    type's highest source number. ``scale`` multiplies every default magnitude (a
    sensitivity sweep: how small a fault is still caught). Returns a one-line summary.
    """
    if not 0 < scale <= 10:
        raise PerturbError(f"scale must be in (0, 10], got {scale}")
    kinds = list(PERTURBATIONS) if kinds is None else list(kinds)
    bad = [k for k in kinds if k not in PERTURBATIONS]
    if bad or not kinds:
        raise PerturbError(f"unknown perturbation(s) {', '.join(bad) or '(none)'}; "
                           f"kinds: {', '.join(PERTURBATIONS)}")
    src, out = Path(src), Path(out)
    ds = Dataset(src)
    labels = read_labels(ds.root)
    if out.exists() and any(out.iterdir()):
        raise PerturbError(f"{out}: exists and is not empty; choose a new folder")
    sources = [v for v in ds.videos(types=types, names=videos)
               if (lab := labels.get((v.type, v.name))) is None or lab.kind == "normal"]
    if not sources:
        raise PerturbError(f"{src}: no normal videos to perturb")
    out.mkdir(parents=True, exist_ok=True)
    new_labels: list[Label] = []
    manifest: list[tuple] = []
    t0 = time.perf_counter()
    written = 0
    total = len(sources) * (len(kinds) + 1)
    for type_id in sorted({v.type for v in sources}):
        tdir = out / f"Type{type_id}"
        tdir.mkdir()
        metadata: dict[str, dict] = {}
        of_type = [v for v in sources if v.type == type_id]
        width = max(len(n) for n in ds.names(type_id))
        number = max(int(n) for n in ds.names(type_id))
        for v in of_type:
            image = v.load()
            write_npz(tdir / f"{v.name}.npz", {"image": image})
            metadata[v.name] = dict(v.metadata)
            new_labels.append(Label(type_id, v.name, "normal", None, None, None))
            written += 1
            states = v.obstacle_states()
            n = image.shape[0]
            for kind in kinds:
                rng = perturbation_rng(seed, type_id, v.name, kind)
                onset = max(1, min(int(rng.uniform(*ONSET_RANGE) * n), n - 1))
                p = PERTURBATIONS[kind]
                magnitude = scale * p.magnitude
                img, obs = perturb_video(image, kind, onset, rng, magnitude, obstacles=states)
                number += 1
                name = f"{number:0{width}d}"
                write_npz(tdir / f"{name}.npz", {"image": img})
                meta = dict(v.metadata)
                meta["SizeInFrames"] = int(img.shape[0])
                assert obs is not None  # given obstacle states, perturb_video returns them
                wins = windows_from_states(obs)
                for k in (1, 2):
                    ini, end = wins[k - 1] if len(wins) >= k else (-1, -1)
                    meta[f"KeyfIniObstacle{k}"], meta[f"KeyfEndObstacle{k}"] = ini, end
                metadata[name] = meta
                end_frame = int(img.shape[0]) - 1
                new_labels.append(Label(type_id, name, kind, onset, end_frame, magnitude))
                manifest.append((type_id, name, v.name, kind, p.family, onset, end_frame,
                                 repr(float(magnitude)), int(img.shape[0]),
                                 first_change(image, img, onset)))
                written += 1
                if progress:
                    rate = written / max(time.perf_counter() - t0, 1e-9)
                    progress(f"perturb: {written}/{total} videos ({rate:.1f} videos/s)")
        save_metadata(tdir / "metadata.pkl", metadata)
    write_labels(out, new_labels)
    with (out / MANIFEST).open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(manifest)
    elapsed = time.perf_counter() - t0
    return (f"wrote {written} videos ({len(manifest)} perturbed: {len(kinds)} kind(s) x "
            f"{len(sources)} normal source video(s)) to {out} in {elapsed:.1f} s")


def read_manifest(root: str | os.PathLike) -> dict[tuple[int, str], dict[str, str]]:
    """``perturbations.csv`` of a perturbed data set as {(type, video): row}; {} if none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {(int(r["type"]), r["video"]): r for r in csv.DictReader(fh)}
