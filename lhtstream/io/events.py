"""The monitor's events: an `Alarm` raised or cleared at one frame, and a `Verdict` at a
video's end. The pipeline makes them (``lhtstream.service.pipeline``); the monitor maps them to the
wire (`lhtstream.io.protocol.to_wire`).

They live in the io layer so that the protocol knows their types; the model layer
re-exports them (``lhtstream.model.detector``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Alarm:
    """An alarm raised or cleared at one frame; `score`/`threshold` in smoothed units,
    times in monotonic ns (`t_frame_ns`: the frame's ``t_ns``)."""

    stream: str
    video: str
    type: int
    frame: int
    t_frame_ns: int
    kind: str
    state: str  # "raise" or "clear"
    score: float
    threshold: float
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    """End-of-video judgement: `score` (largest evidence / its threshold, 1.0 = at a
    threshold; see ``lhtstream.model.detector``), `anomalous`, alarms raised and their
    kinds."""

    stream: str
    video: str
    type: int
    frames: int
    score: float
    anomalous: bool
    alarms: int
    kinds: list[str] = field(default_factory=list)


Event = Alarm | Verdict
"""What the pipeline returns and the protocol maps to the wire."""
