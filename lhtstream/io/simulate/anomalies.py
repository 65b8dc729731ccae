"""The anomaly catalogue: what each fault does, its default magnitude, and its timing.

Process faults act in the physics (spot path, power, optics, scanner clock)
before the camera renders; sensor faults (`SENSOR_KINDS`) act on the published
difference frames. Every fault has an inclusive frame span [onset, end].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANOMALY_KINDS: tuple[str, ...] = (
    "position_noise",
    "power_drop",
    "power_spike",
    "scanner_stall",
    "pattern_shrink",
    "frequency_drift",
    "spot_defocus",
    "obstacle_pattern_misplaced",
    "camera_dropout",
    "frame_freeze",
    "pattern_drift",
)
SENSOR_KINDS: tuple[str, ...] = ("camera_dropout", "frame_freeze")

# Default magnitude per kind and its meaning.
DEFAULT_MAGNITUDE: dict[str, float] = {
    "position_noise": float(np.sqrt(0.02)),  # px std per axis per frame (KDE-AMD protocol)
    "power_drop": -0.35,  # relative change of laser power
    "power_spike": 0.5,  # relative change of laser power
    "scanner_stall": 0.0,  # scanner rate factor while stalled (0 = spot frozen in place)
    "pattern_shrink": 0.8,  # size factor of the eight about its centre
    "frequency_drift": 0.03,  # relative scan-frequency change (ramped over FREQ_DRIFT_RAMP)
    "spot_defocus": 1.8,  # spot sigma factor
    "obstacle_pattern_misplaced": 1.0,  # pattern code run: 1 top, 2 middle, 3 bottom
    "camera_dropout": 1.0,  # fraction of pixels blanked
    "frame_freeze": 1.0,  # (no scale) the frame before onset repeats byte-identically
    "pattern_drift": 1.0,  # px the whole eight moves (diagonally down-right; scanner zero drift)
}
# Kinds whose magnitude can grow gradually (`Anomaly.ramp_frames`); the others are switches.
RAMPABLE_KINDS: tuple[str, ...] = (
    "position_noise", "power_drop", "power_spike", "scanner_stall", "pattern_shrink",
    "frequency_drift", "spot_defocus", "pattern_drift",
)
FREQ_DRIFT_RAMP = 20  # frames over which frequency_drift reaches its full step
ONSET_MIN_FRAC = 0.2  # anomalies start after this fraction of the video ...
ONSET_MAX_FRAC = 0.55  # ... and before this one
SPAN_MIN, SPAN_MAX = 100, 1000  # frames, before capping to SPAN_MAX_FRAC of the video
SPAN_MAX_FRAC = 0.3


@dataclass(frozen=True)
class Anomaly:
    """One injected fault: kind, inclusive frame span, magnitude (see DEFAULT_MAGNITUDE).

    ``ramp_frames`` > 0: the magnitude grows linearly from the onset and is complete
    ``ramp_frames`` frames later (frame onset + ramp_frames - 1); kinds not in
    `RAMPABLE_KINDS` ignore it (they start at full magnitude).
    """

    kind: str
    onset_frame: int
    end_frame: int
    magnitude: float
    ramp_frames: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(
                f"unknown anomaly kind {self.kind!r}; kinds: {', '.join(ANOMALY_KINDS)}"
            )
        if not 0 <= self.onset_frame <= self.end_frame:
            raise ValueError(
                f"anomaly span {self.onset_frame}..{self.end_frame} is not 0 <= onset <= end"
            )
        if self.ramp_frames < 0:
            raise ValueError(f"ramp frames must be >= 0, got {self.ramp_frames}")

    def ramp(self) -> np.ndarray:
        """(span,) share of the full magnitude reached at each frame of the span (0..1]."""
        n = self.end_frame - self.onset_frame + 1
        if self.ramp_frames <= 0 or self.kind not in RAMPABLE_KINDS:
            return np.ones(n)
        return np.minimum(1.0, (np.arange(n) + 1.0) / self.ramp_frames)


def draw_ramped_span(rng: np.random.Generator, frames: int, ramp_frames: int) -> tuple[int, int]:
    """Inclusive [onset, end] holding a whole ramp of ``ramp_frames`` plus a usual span:
    the onset is drawn in 20-55% of the frames that leave room for the ramp."""
    room = frames - ramp_frames
    if room < 2 * SPAN_MIN:
        raise ValueError(
            f"a {ramp_frames}-frame ramp needs videos of at least {ramp_frames + 2 * SPAN_MIN} "
            f"frames, got {frames}"
        )
    onset = max(1, int(rng.uniform(ONSET_MIN_FRAC, ONSET_MAX_FRAC) * room))
    hold = int(rng.uniform(SPAN_MIN, SPAN_MAX))
    return onset, min(onset + ramp_frames - 1 + hold, frames - 1)


def draw_span(
    rng: np.random.Generator, frames: int, avoid: list[tuple[int, int]] | None = None
) -> tuple[int, int]:
    """Inclusive [onset, end] after the first 20% of the video, not touching ``avoid``."""
    cap = max(1, int(SPAN_MAX_FRAC * frames))
    for _ in range(64):
        onset = int(rng.uniform(ONSET_MIN_FRAC, ONSET_MAX_FRAC) * frames)
        span = min(int(rng.uniform(SPAN_MIN, SPAN_MAX)), cap)
        end = min(onset + span - 1, frames - 1)
        onset = max(1, min(onset, end))
        if not avoid or all(end < a - 1 or onset > b + 1 for a, b in avoid):
            return onset, end
    # fall back: the longest free stretch after 20% of the video
    free_start = int(ONSET_MIN_FRAC * frames)
    best = (free_start, free_start)
    cursor = free_start
    for a, b in sorted(avoid or []) + [(frames + 1, frames + 1)]:
        if a - 2 - cursor > best[1] - best[0]:
            best = (cursor, a - 2)
        cursor = max(cursor, b + 2)
    onset, end = best
    end = min(end, onset + cap - 1, frames - 1)
    return onset, max(onset, end)


def resolve(
    kind_or_anomaly: str | Anomaly | tuple | None,
    rng: np.random.Generator,
    frames: int,
    windows: list[tuple[int, int]],
    ramp_frames: int = 0,
) -> Anomaly | None:
    """Turn a kind name (timing drawn from ``rng``, default magnitude) into an Anomaly;
    with ``ramp_frames`` a rampable kind's span holds the whole ramp."""
    if kind_or_anomaly is None or isinstance(kind_or_anomaly, Anomaly):
        return kind_or_anomaly
    if isinstance(kind_or_anomaly, tuple):
        return Anomaly(*kind_or_anomaly)
    kind = str(kind_or_anomaly)
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; kinds: {', '.join(ANOMALY_KINDS)}")
    if ramp_frames > 0 and kind in RAMPABLE_KINDS:
        onset, end = draw_ramped_span(rng, frames, ramp_frames)
        return Anomaly(kind, onset, end, DEFAULT_MAGNITUDE[kind], ramp_frames)
    avoid = windows if kind == "obstacle_pattern_misplaced" else None
    onset, end = draw_span(rng, frames, avoid)
    return Anomaly(kind, onset, end, DEFAULT_MAGNITUDE[kind])
