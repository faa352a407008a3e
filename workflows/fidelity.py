"""How close a sparse/edited render is to the dense one: PSNR and SSIM on uint8 frames."""
from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames (peak 255); inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over (2r+1)² windows of the last two axes (valid region only), by summed-area tables."""
    c = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]).cumsum(-1).cumsum(-2)
    k = 2 * r + 1
    s = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return s / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, radius: int = 3) -> float:
    """Mean SSIM (Wang et al. 2004, uniform 7×7 window, K1=0.01, K2=0.03) of uint8 frames [..., H, W, C]."""
    if a.shape != b.shape:
        raise ValueError(f"frames must have the same shape, got {a.shape} and {b.shape}")
    x = np.moveaxis(a.astype(np.float64), -1, -3)  # [..., C, H, W]
    y = np.moveaxis(b.astype(np.float64), -1, -3)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box(x, radius), _box(y, radius)
    vx = _box(x * x, radius) - mx * mx
    vy = _box(y * y, radius) - my * my
    cxy = _box(x * y, radius) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
