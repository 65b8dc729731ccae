"""Process simulator writing the published data-set format (see docs/dataset.md)."""

from lhtstream.io.simulate.anomalies import ANOMALY_KINDS, DEFAULT_MAGNITUDE, SENSOR_KINDS, Anomaly
from lhtstream.io.simulate.video import SimulatedVideo, simulate_video
from lhtstream.io.simulate.writer import synthesize

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_MAGNITUDE",
    "SENSOR_KINDS",
    "Anomaly",
    "SimulatedVideo",
    "simulate_video",
    "synthesize",
]
