"""Scan patterns as closed polylines traversed at constant speed, one pattern per scanner cycle.

Coordinates are relative to the eight's centre, in px, x to the right and y
down (image convention): the top edge is at y = -half_height, the middle line
at 0, the bottom edge at +half_height; the eight spans x in [-width/2, width/2].

Each pattern is parametrised by the scanner phase in [0, 10) frames: phase 0
is the centre of the top edge on the plain eight (segment 1, moving left) and
the start of segment 1 for the 18-segment obstacle patterns (next to the obstacle).
"""

from __future__ import annotations

import numpy as np

from lhtstream.io.simulate.params import CYCLE_FRAMES

PATTERNS = ("eight", "top", "middle", "bottom")  # index = pattern code used in the arrays


def pattern_vertices(
    pattern: str, width: float, half_height: float, obstacle_x: float = 0.0, gap: float = 1.5
) -> tuple[np.ndarray, float]:
    """Closed polyline (vertices, first == last) and the arc length where phase 0 sits."""
    r, left = width / 2, -width / 2
    t, m, b = -half_height, 0.0, half_height
    if pattern == "eight":
        # 1 top R->L, 2 upper-left down, 3 middle L->R, 4 lower-right down,
        # 5 bottom R->L, 6 lower-left up, 7 middle L->R, 8 upper-right up
        pts = [(r, t), (left, t), (left, m), (r, m), (r, b), (left, b), (left, m), (r, m), (r, t)]
        return np.array(pts, dtype=np.float64), width / 2
    if pattern in ("top", "bottom"):
        # ModDiagram left/right: the eight forwards from the obstacle, back to it from the
        # other side, then the eight backwards (18 segments); "bottom" mirrors "top".
        e = t if pattern == "top" else b
        o = b if pattern == "top" else t
        lo, hi = obstacle_x - gap, obstacle_x + gap
        pts = [
            (lo, e),
            (left, e),
            (left, m),
            (r, m),
            (r, o),
            (left, o),
            (left, m),
            (r, m),
            (r, e),
            (hi, e),
            (r, e),
            (r, m),
            (left, m),
            (left, o),
            (r, o),
            (r, m),
            (left, m),
            (left, e),
            (lo, e),
        ]
        return np.array(pts, dtype=np.float64), 0.0
    if pattern == "middle":
        # ModDiagram centre: 10 segments bouncing off an obstacle on the middle line.
        lo, hi = obstacle_x - gap, obstacle_x + gap
        pts = [
            (r, t),
            (left, t),
            (left, m),
            (lo, m),
            (left, m),
            (left, b),
            (r, b),
            (r, m),
            (hi, m),
            (r, m),
            (r, t),
        ]
        return np.array(pts, dtype=np.float64), width / 2
    raise ValueError(f"unknown pattern {pattern!r}")


def positions(phase: np.ndarray, vertices: np.ndarray, s0: float) -> tuple[np.ndarray, np.ndarray]:
    """Spot (x, y) at scanner phases (frames) along a closed polyline at constant speed."""
    seg = np.hypot(np.diff(vertices[:, 0]), np.diff(vertices[:, 1]))
    cum = np.concatenate(([0.0], np.cumsum(seg)))
    total = cum[-1]
    s = np.mod(s0 + (phase / CYCLE_FRAMES) * total, total)
    return np.interp(s, cum, vertices[:, 0]), np.interp(s, cum, vertices[:, 1])
