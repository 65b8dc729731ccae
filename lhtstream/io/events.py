"""The monitor's events: an `Alarm` raised or cleared at one frame, and a `Verdict` at a
video's end. The pipeline makes them (``lhtstream.service.pipeline``, with frame and time
filled in), `lhtstream.io.protocol.to_wire` maps them to the wire and ``from_wire`` back.

They live in the io layer so that the protocol knows their types; the model layer
re-exports them (``lhtstream.model.detector``). The fields with defaults after the
pipeline's are the wire's own: 0 / False until the monitor gives them (``seq``: the
journal's; ``t_alarm_ns``, ``t_ns``: now, when mapped to the wire; ``partial``: the
monitor's, a verdict over part of a video).
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
    seq: int = 0  # the journal's, 0 until journaled
    t_alarm_ns: int = 0  # when it was decided; 0: now, when mapped to the wire


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
    t_ns: int = 0  # monotonic ns when made; 0: now, when mapped to the wire
    partial: bool = False  # the video was not seen from its start


Event = Alarm | Verdict
"""What the pipeline returns and the protocol maps to the wire."""
