"""Every physical constant and noise magnitude of the simulator, in one place.

The realism knobs (DESIGN section 5: a faithful KDE-AMD should score near
AUC 0.978 on normal vs 0.14 px position-noise videos) are the ``*_NOISE``,
``*_JITTER`` and ``VIDEO_*`` constants below; tune them here, nowhere else.
Units: pixels (px) of the 32x32 sensor, frames (1 frame = 1 ms), camera counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- clocks
FPS = 1000.0  # camera frames per second
SCAN_HZ = 100.0  # nominal scanner frequency: one pattern per 10 frames
CYCLE_FRAMES = FPS / SCAN_HZ  # 10 frames per cycle; phase lives in [0, CYCLE_FRAMES)
SUBSTEPS = 16  # spot positions integrated per 1 ms exposure (spot moves ~7 px/ms)
WARMUP_FRAMES = 60  # frames simulated before frame 0 so the heat field is in steady state

# ---------------------------------------------------------------- scanner variation (realism knobs)
# Per-video scan-frequency offset |delta| in [MIN, MAX] (relative), random sign:
# the 10 samples per cycle precess as scanner and camera clocks are independent.
# MIN calibrated (docs/kdeamd.md): at 1e-4 a 15 s video's samples moved only ~0.15
# cycle, sat on a few spots of the eight and made the published KDE-AMD's worst types
# fall to AUC 0.67; at 5e-4 every video precesses >= 0.75 cycle.
VIDEO_FREQ_OFFSET_MIN = 5e-4
VIDEO_FREQ_OFFSET_MAX = 1e-3
# Slow frequency jitter: Ornstein-Uhlenbeck on the relative rate.
FREQ_JITTER_REL = 3e-4  # stationary std of the relative rate
FREQ_JITTER_TAU_FRAMES = 300.0  # correlation time
# Per-frame scanner position jitter (galvo noise), px, each axis, independent per frame.
SCANNER_JITTER_PX = 0.04
# Per-video placement/size variation of the eight inside the ROI.
VIDEO_OFFSET_PX = 0.6  # centre offset, uniform in +-this, each axis
VIDEO_AMPLITUDE_REL = 0.007  # std of the relative size of the eight; calibrated, docs/kdeamd.md
VIDEO_POWER_REL = 0.04  # std of the relative laser power
VIDEO_SIGMA_REL = 0.03  # std of the relative spot size

# ------------------------------------------------ camera / heat (per workstation 0..3)
WORKSTATION_SPOT_SIGMA_PX = (1.15, 1.35, 1.25, 1.45)  # optics: Gaussian spot sigma on the sensor
WORKSTATION_POWER = (1.00, 0.90, 1.10, 0.95)  # relative laser power
WORKSTATION_NOISE = (0.45, 0.60, 0.50, 0.70)  # sensor noise std per raw frame, counts
# Heat one exposure deposits at power 1, counts x px^2 (the Gaussian's integral, so a
# defocused spot spreads the same energy thinner): ~420 counts peak for a 1.3 px spot at rest.
DEPOSIT_COUNTS = 420.0 * 2.0 * 3.141592653589793 * 1.3**2
# Fixed-pattern pixel gain non-uniformity of each workstation's camera (relative std);
# gives the blob the grainy look of the real frame.
PIXEL_GAIN_REL = 0.08
COOLING = 0.80  # fraction of heat left after one frame (before diffusion)
DIFFUSION = 0.06  # fraction exchanged with each 4-neighbour per frame
AMBIENT_COUNTS = 180.0  # raw level of the cold workpiece
MAX_COUNTS = 1024  # camera range 0..1024

# ---------------------------------------------------------------- geometry (per workpiece 0..8)
EIGHT_WIDTH_PX = (11.0, 12.5, 14.0, 15.5, 13.0, 16.0, 12.0, 14.5, 15.0)
EIGHT_HALF_HEIGHT_PX = (4.0, 4.5, 5.0, 5.5, 6.0, 4.5, 5.0, 5.5, 6.0)
ROI_MARGIN_X_PX = 3.5  # ROI columns = round(width + 2 margin) + type jitter
ROI_MARGIN_Y_PX = 3.0
# Obstacle windows per workpiece: number and location(s) ("top", "middle", "bottom").
WORKPIECE_OBSTACLES: tuple[tuple[str, ...], ...] = (
    (),
    ("top",),
    ("middle", "bottom"),
    (),
    ("bottom",),
    ("top", "middle"),
    ("middle",),
    (),
    ("bottom", "top"),
)
OBSTACLE_GAP_REL = 0.12  # half-width of the avoided zone, fraction of the eight's width
OBSTACLE_POS_REL = 0.15  # obstacle centre within +-this fraction of the width from the middle


@dataclass(frozen=True, eq=False)
class TypeConfig:
    """Deterministic per-type configuration (type t -> workstation (t-1)//9, workpiece (t-1)%9)."""

    type_id: int
    workstation: int
    workpiece: int
    width: float  # px, horizontal extent of the eight
    half_height: float  # px, top edge to middle line
    rows: int
    cols: int
    sup: int  # ROI top row on the sensor
    left: int  # ROI left column on the sensor
    spot_sigma: float
    power: float
    noise: float
    gain: np.ndarray  # (rows, cols) pixel gain of the ROI (fixed pattern of the camera)
    obstacles: tuple[str, ...]
    obstacle_x: tuple[float, ...]  # obstacle centre offsets from the middle, px


def type_config(type_id: int) -> TypeConfig:
    """Configuration of batch type 1..36."""
    if not 1 <= type_id <= 36:
        raise ValueError(f"type {type_id} is outside 1..36")
    ws, wp = (type_id - 1) // 9, (type_id - 1) % 9
    rng = np.random.default_rng([0x1A5E, type_id])
    width = EIGHT_WIDTH_PX[wp] * (1 + 0.03 * (ws - 1.5) / 1.5)
    half = EIGHT_HALF_HEIGHT_PX[wp]
    cols = int(np.clip(round(width + 2 * ROI_MARGIN_X_PX + rng.integers(0, 3)), 18, 26))
    rows = int(np.clip(round(2 * half + 2 * ROI_MARGIN_Y_PX + rng.integers(0, 3)), 14, 20))
    sup = int(rng.integers(0, 32 - rows + 1))
    left = int(rng.integers(0, 32 - cols + 1))
    cam = np.random.default_rng([0xCA3E7A, ws]).standard_normal((32, 32))
    gain = 1.0 + PIXEL_GAIN_REL * cam[sup : sup + rows, left : left + cols]
    obstacles = WORKPIECE_OBSTACLES[wp]
    obstacle_x = tuple(
        float(rng.uniform(-OBSTACLE_POS_REL, OBSTACLE_POS_REL) * width) for _ in obstacles
    )
    return TypeConfig(
        type_id=type_id,
        workstation=ws,
        workpiece=wp,
        width=float(width),
        half_height=float(half),
        rows=rows,
        cols=cols,
        sup=sup,
        left=left,
        spot_sigma=WORKSTATION_SPOT_SIGMA_PX[ws],
        power=WORKSTATION_POWER[ws],
        noise=WORKSTATION_NOISE[ws],
        gain=gain,
        obstacles=obstacles,
        obstacle_x=obstacle_x,
    )
