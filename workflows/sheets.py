"""Pictures that compare renders: side-by-side frames and a contact sheet (frames in rows, one row per run)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_GAP = 2


def side_by_side(runs: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of each run, placed left to right with a white gap: [F, H, W·n + gaps, 3]."""
    arrays = list(runs.values())
    f, h = arrays[0].shape[:2]
    gap = np.full((f, h, _GAP, 3), 255, np.uint8)
    parts = [arrays[0]]
    for a in arrays[1:]:
        parts += [gap, a]
    return np.concatenate(parts, axis=2)


def contact_sheet(runs: dict[str, np.ndarray], columns: int = 9, scale: int = 2) -> Image.Image:
    """One labelled row per run, ``columns`` frames picked evenly across the video, upscaled by ``scale``."""
    rows = []
    label_w = 56
    for name, frames in runs.items():
        idx = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        strip = np.concatenate([np.pad(frames[i], ((0, _GAP), (0, _GAP), (0, 0)), constant_values=255)
                                for i in idx], axis=1)
        strip = strip.repeat(scale, 0).repeat(scale, 1)
        label = Image.new("RGB", (label_w, strip.shape[0]), "white")
        ImageDraw.Draw(label).text((2, 2), name[:9], fill="black")
        rows.append(np.concatenate([np.asarray(label), strip], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))
