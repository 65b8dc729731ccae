"""Per-frame latency of the monitor: recorded into preallocated rings, summarised as
percentiles once per status interval (never per frame)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lhtstream.base.stats import percentiles

STREAM_LATENCY_CAPACITY = 1 << 16
"""Latency samples kept per stream and status interval (65 k: > 1 min at 1 kHz); older
ones are overwritten when a burst exceeds it, but ``max`` is tracked exactly."""
LATENCY_QS = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))
"""The percentiles a status reports (``latency_us``, ``service_us``), named as on the wire."""


class LatencyRecorder:
    """Per-frame times in µs in a preallocated ring; summarised per status interval.

    One ``record`` per frame stores both times the monitor reports: ``total`` (done minus
    the frame's ``t_ns``: transport, queueing and handling) and ``service`` (message
    received -> done). ``summary`` gives ``{p50, p99, p999, max}`` of each.
    """

    def __init__(self, capacity: int = STREAM_LATENCY_CAPACITY) -> None:
        self._total = np.zeros(capacity, dtype=np.float64)
        self._service = np.zeros(capacity, dtype=np.float64)
        self._n = 0  # samples since the last summary (may exceed capacity: wrap around)
        self._max = 0.0
        self._service_max = 0.0

    def record(self, total_us: float, service_us: float) -> None:
        i = self._n % self._total.shape[0]
        self._total[i] = total_us
        self._service[i] = service_us
        self._n += 1
        if total_us > self._max:
            self._max = total_us
        if service_us > self._service_max:
            self._service_max = service_us

    def record_block(self, total_us: np.ndarray, service_us: np.ndarray) -> None:
        """``record`` for each element, in order (a block of frames, one record each)."""
        n = total_us.shape[0]
        if n == 0:
            return
        cap = self._total.shape[0]
        if n > cap:  # only the last `cap` survive a wrap-around anyway
            self._n += n - cap
            self._max = max(self._max, float(total_us.max()))
            self._service_max = max(self._service_max, float(service_us.max()))
            total_us, service_us, n = total_us[-cap:], service_us[-cap:], cap
        i = self._n % cap
        head = min(n, cap - i)
        self._total[i:i + head] = total_us[:head]
        self._service[i:i + head] = service_us[:head]
        self._total[:n - head] = total_us[head:]
        self._service[:n - head] = service_us[head:]
        self._n += n
        self._max = max(self._max, float(total_us.max()))
        self._service_max = max(self._service_max, float(service_us.max()))

    def window(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(total, service, max total, max service) of the current interval (views)."""
        n = min(self._n, self._total.shape[0])
        return self._total[:n], self._service[:n], self._max, self._service_max

    def reset(self) -> None:
        self._n = 0
        self._max = 0.0
        self._service_max = 0.0

    def take(self) -> LatencyRecorder:
        """The current interval as a recorder of its own (a copy), and a new one here."""
        total, service, top, service_top = self.window()
        taken = LatencyRecorder(0)
        taken._total, taken._service = total.copy(), service.copy()
        taken._n, taken._max, taken._service_max = total.shape[0], top, service_top
        self.reset()
        return taken

    def summary(self, reset: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """(total, service) summaries over the interval, then (by default) a new interval."""
        total, service, top, service_top = self.window()
        out = percentile_summary(total, top), percentile_summary(service, service_top)
        if reset:
            self.reset()
        return out


def percentile_summary(values: np.ndarray, top: float) -> dict[str, float | None]:
    """``{p50, p99, p999, max}`` of ``values`` (µs, rounded to 0.1); all None when empty.

    ``top`` is the exact maximum, which a wrapped-around ring may no longer hold.
    """
    return percentiles(values, LATENCY_QS, top)
