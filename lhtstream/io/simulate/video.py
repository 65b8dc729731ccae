"""Simulate one video: scanner clock -> spot path -> heat field -> difference frames + truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lhtstream.io.simulate import params as P
from lhtstream.io.simulate.anomalies import FREQ_DRIFT_RAMP, Anomaly, resolve
from lhtstream.io.simulate.camera import render_difference_frames
from lhtstream.io.simulate.scanpath import PATTERNS, pattern_vertices, positions


@dataclass
class SimulatedVideo:
    """A simulated video: ``image`` (frames, rows, cols) uint16, its metadata entry,
    ``truth`` ({"x", "y", "phase", "rate", "pattern"} per frame; x, y in ROI px at
    mid-exposure, phase in [0, 10) frames) and ``label`` (kind, onset, end, magnitude)."""

    type_id: int
    image: np.ndarray
    metadata: dict[str, int]
    truth: dict[str, np.ndarray]
    label: tuple[str, int | None, int | None, float | None]
    anomaly: Anomaly | None = None
    info: dict[str, Any] = field(default_factory=dict)


def draw_windows(rng: np.random.Generator, frames: int, n: int) -> list[tuple[int, int]]:
    """Obstacle windows (inclusive frames) for a video of ``frames``: 1 or 2 well inside it."""
    if n == 0 or frames < 50:
        return []
    if n == 1:
        starts, lengths = [(0.30, 0.45)], [(0.08, 0.16)]
    else:
        starts, lengths = [(0.12, 0.22), (0.60, 0.70)], [(0.05, 0.12), (0.05, 0.12)]
    out = []
    for (s_lo, s_hi), (l_lo, l_hi) in zip(starts, lengths, strict=True):
        ini = int(rng.uniform(s_lo, s_hi) * frames)
        end = min(ini + max(1, int(rng.uniform(l_lo, l_hi) * frames)) - 1, frames - 2)
        out.append((ini, end))
    return out


def _ou(rng: np.random.Generator, n: int, std: float, tau: float) -> np.ndarray:
    a = np.exp(-1.0 / tau)
    e = rng.standard_normal(n) * std * np.sqrt(1 - a * a)
    out = np.empty(n)
    v = rng.standard_normal() * std
    for i in range(n):  # n ~ 15k: a plain loop costs a few ms
        v = a * v + e[i]
        out[i] = v
    return out


def simulate_video(
    type_id: int,
    video_seed: int,
    frames: int,
    anomaly: str | Anomaly | tuple | None = None,
    *,
    windows: list[tuple[int, int]] | None = None,
    ramp_frames: int = 0,
) -> SimulatedVideo:
    """Simulate one difference video of batch type ``type_id`` (1..36), ``frames`` ms long.

    ``anomaly``: None, a kind from ANOMALY_KINDS (timing drawn, default magnitude) or an
    Anomaly; ``ramp_frames`` > 0 makes a drawn rampable fault grow linearly from its
    onset over that many frames (`Anomaly.ramp_frames`). ``windows``: override the
    obstacle windows (inclusive frames; [] = none), default drawn for the type.
    Randomness comes from independent streams, so the same seed with and without an
    anomaly (or obstacle) gives identical frames before it.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    cfg = P.type_config(type_id)
    streams = np.random.SeedSequence([int(video_seed) % (1 << 63), type_id, 0x5EED]).spawn(6)
    g_rng, s_rng, j_rng, n_rng, o_rng, a_rng = (np.random.default_rng(s) for s in streams)

    # per-video variation
    dx, dy = g_rng.uniform(-P.VIDEO_OFFSET_PX, P.VIDEO_OFFSET_PX, 2)
    amp = 1.0 + P.VIDEO_AMPLITUDE_REL * g_rng.standard_normal()
    power = cfg.power * (1.0 + P.VIDEO_POWER_REL * g_rng.standard_normal()) * P.DEPOSIT_COUNTS
    sigma = cfg.spot_sigma * (1.0 + P.VIDEO_SIGMA_REL * g_rng.standard_normal())
    delta = g_rng.uniform(P.VIDEO_FREQ_OFFSET_MIN, P.VIDEO_FREQ_OFFSET_MAX) * g_rng.choice(
        [-1.0, 1.0]
    )
    phase0 = g_rng.uniform(0.0, P.CYCLE_FRAMES)

    if windows is None:
        windows = draw_windows(o_rng, frames, len(cfg.obstacles))
    windows = [(int(a), int(b)) for a, b in windows]
    anom = resolve(anomaly, a_rng, frames, windows, ramp_frames)
    if anom is not None and anom.end_frame >= frames:
        raise ValueError(
            f"anomaly span {anom.onset_frame}..{anom.end_frame} is past the end ({frames} frames)"
        )

    w = P.WARMUP_FRAMES
    n_total = w + frames
    k_sub = P.SUBSTEPS
    rate = (1.0 + delta) * (1.0 + _ou(s_rng, n_total, P.FREQ_JITTER_REL, P.FREQ_JITTER_TAU_FRAMES))
    jitter = j_rng.standard_normal((2, n_total)) * P.SCANNER_JITTER_PX
    noise = n_rng.standard_normal((n_total, cfg.rows, cfg.cols), dtype=np.float32)
    power_f = np.full(n_total, power)
    sigma_f = np.full(n_total, sigma)
    scale_f = np.full(n_total, amp)
    code = np.zeros(n_total, dtype=np.int8)
    obstacle_x = np.zeros(n_total)
    for i, (ini, end) in enumerate(windows):
        kind = cfg.obstacles[i % len(cfg.obstacles)] if cfg.obstacles else "top"
        code[w + ini : w + end + 1] = PATTERNS.index(kind)
        obstacle_x[w + ini : w + end + 1] = cfg.obstacle_x[i] if i < len(cfg.obstacle_x) else 0.0

    drift = np.zeros(n_total)  # pattern_drift: px the eight's centre moved, each axis
    if anom is not None:
        sl = slice(w + anom.onset_frame, w + anom.end_frame + 1)
        m = anom.magnitude
        n_span = anom.end_frame - anom.onset_frame + 1
        r = anom.ramp()  # share of the full magnitude per span frame (all 1 without a ramp)
        if anom.kind == "position_noise":
            jitter[:, sl] += a_rng.standard_normal((2, n_span)) * m * r
        elif anom.kind in ("power_drop", "power_spike"):
            power_f[sl] *= 1.0 + m * r
        elif anom.kind == "scanner_stall":
            rate[sl] *= 1.0 + (m - 1.0) * r
        elif anom.kind == "pattern_shrink":
            scale_f[sl] *= 1.0 + (m - 1.0) * r
        elif anom.kind == "frequency_drift":
            if anom.ramp_frames <= 0:
                r = np.minimum(1.0, (np.arange(n_span) + 1.0) / FREQ_DRIFT_RAMP)
            rate[sl] *= 1.0 + m * r
        elif anom.kind == "spot_defocus":
            sigma_f[sl] *= 1.0 + (m - 1.0) * r
        elif anom.kind == "pattern_drift":
            drift[sl] = m * r / np.sqrt(2.0)
        elif anom.kind == "obstacle_pattern_misplaced":
            pat = int(round(m))
            if not 1 <= pat <= 3:
                pat = PATTERNS.index(cfg.obstacles[0]) if cfg.obstacles else 1
            code[sl] = pat
            obstacle_x[sl] = cfg.obstacle_x[0] if cfg.obstacle_x else 0.0

    # scanner phase (frames) at the start of each frame, then at sub-steps and mid-exposure
    start = phase0 + np.concatenate(([0.0], np.cumsum(rate[:-1])))
    fracs = np.concatenate(((np.arange(k_sub) + 0.5) / k_sub, [0.5]))
    ph = start[:, None] + rate[:, None] * fracs[None, :]
    xs = np.empty_like(ph)
    ys = np.empty_like(ph)
    gap = P.OBSTACLE_GAP_REL * cfg.width
    for c in np.unique(code):
        for ox in np.unique(obstacle_x[code == c]):
            sel = (code == c) & (obstacle_x == ox)
            verts, s0 = pattern_vertices(PATTERNS[c], cfg.width, cfg.half_height, ox, gap)
            xs[sel], ys[sel] = positions(ph[sel], verts, s0)
    cx = (cfg.cols - 1) / 2.0 + dx
    cy = (cfg.rows - 1) / 2.0 + dy
    xs = cx + drift[:, None] + scale_f[:, None] * xs + jitter[0][:, None]
    ys = cy + drift[:, None] + scale_f[:, None] * ys + jitter[1][:, None]

    image = np.empty((frames, cfg.rows, cfg.cols), dtype=np.uint16)
    render_difference_frames(
        np.ascontiguousarray(xs[:, :k_sub]),
        np.ascontiguousarray(ys[:, :k_sub]),
        power_f,
        sigma_f,
        cfg.gain,
        noise,
        float(cfg.noise),
        P.AMBIENT_COUNTS,
        P.COOLING,
        P.DIFFUSION,
        P.MAX_COUNTS,
        w,
        image,
    )
    if anom is not None and anom.kind == "camera_dropout":
        image[anom.onset_frame : anom.end_frame + 1] = 0
    elif anom is not None and anom.kind == "frame_freeze":
        image[anom.onset_frame : anom.end_frame + 1] = image[max(anom.onset_frame - 1, 0)]

    meta = {
        "Index": type_id,
        "KeyfIniObstacle1": windows[0][0] if len(windows) > 0 else -1,
        "KeyfEndObstacle1": windows[0][1] if len(windows) > 0 else -1,
        "KeyfIniObstacle2": windows[1][0] if len(windows) > 1 else -1,
        "KeyfEndObstacle2": windows[1][1] if len(windows) > 1 else -1,
        "LeftBordPx": cfg.left,
        "RightBordPx": cfg.left + cfg.cols - 1,
        "SupBordPx": cfg.sup,
        "InfBordPx": cfg.sup + cfg.rows - 1,
        "SizeInFrames": frames,
    }
    truth = {
        "x": xs[w:, k_sub].copy(),
        "y": ys[w:, k_sub].copy(),
        "phase": np.mod(ph[w:, k_sub], P.CYCLE_FRAMES),
        "rate": rate[w:].copy(),
        "pattern": code[w:].copy(),
    }
    label = (
        ("normal", None, None, None)
        if anom is None
        else (anom.kind, anom.onset_frame, anom.end_frame, float(anom.magnitude))
    )
    info = {"centre": (cx, cy), "scale": amp, "power": power, "sigma": sigma, "freq_offset": delta}
    return SimulatedVideo(type_id, image, meta, truth, label, anom, info)
