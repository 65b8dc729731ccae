"""Thermal camera: heat field on the ROI, sensor noise, quantisation, difference frames.

One Numba kernel renders a whole video: per frame the heat field cools and
diffuses, the spot deposits a Gaussian at each sub-step position of the 1 ms
exposure, the raw frame is ambient + heat + sensor noise quantised to 0..1024,
and the published frame is max(raw[t] - raw[t-1], 0). Constants: `params`.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def render_difference_frames(
    xs,
    ys,
    power,
    sigma,
    gain,
    noise,
    noise_std,
    ambient,
    cooling,
    diffusion,
    max_counts,
    warmup,
    out,
):
    """Fill ``out`` (frames, rows, cols) uint16 with difference frames.

    xs, ys: (warmup + frames, substeps) spot positions in ROI px (x = column, y = row);
    power: (warmup + frames,) heat per exposure, counts x px^2 (integral of the Gaussian);
    sigma: (warmup + frames,) spot sigma px; gain: (rows, cols) pixel gain;
    noise: (warmup + frames, rows, cols) standard-normal float32 draws scaled by
    ``noise_std`` counts. The first ``warmup`` frames only settle the heat field.
    """
    n_total, k_sub = xs.shape
    rows, cols = out.shape[1], out.shape[2]
    heat = np.zeros((rows, cols))
    tmp = np.zeros((rows, cols))
    prev = np.zeros((rows, cols), dtype=np.int64)
    gx = np.zeros(cols)
    gy = np.zeros(rows)
    for f in range(n_total):
        # cooling and 4-neighbour diffusion (zero flux at the ROI border)
        for i in range(rows):
            for j in range(cols):
                h = heat[i, j]
                up = heat[i - 1, j] if i > 0 else h
                dn = heat[i + 1, j] if i < rows - 1 else h
                lf = heat[i, j - 1] if j > 0 else h
                rt = heat[i, j + 1] if j < cols - 1 else h
                tmp[i, j] = cooling * (h + diffusion * (up + dn + lf + rt - 4.0 * h))
        heat, tmp = tmp, heat
        # deposit along the exposure path (separable Gaussian per sub-step)
        s = sigma[f]
        inv = 1.0 / (2.0 * s * s)
        amp = power[f] * inv / (np.pi * k_sub)  # Gaussian of integral power[f] / k_sub
        for k in range(k_sub):
            x = xs[f, k]
            y = ys[f, k]
            for j in range(cols):
                d = j - x
                gx[j] = np.exp(-d * d * inv)
            for i in range(rows):
                d = i - y
                gy[i] = amp * np.exp(-d * d * inv)
            for i in range(rows):
                a = gy[i]
                if a < 1e-4:
                    continue
                for j in range(cols):
                    heat[i, j] += a * gx[j]
        # raw frame and difference
        for i in range(rows):
            for j in range(cols):
                r = ambient + gain[i, j] * heat[i, j] + noise_std * noise[f, i, j]
                q = np.int64(np.floor(r + 0.5))
                if q < 0:
                    q = 0
                elif q > max_counts:
                    q = max_counts
                if f >= warmup:
                    d = q - prev[i, j]
                    out[f - warmup, i, j] = d if d > 0 else 0
                prev[i, j] = q
