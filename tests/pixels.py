"""Pixel checks for written outputs: read images, mp4 files and PNG-frame folders back and test their content."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_frames(path: str | Path) -> np.ndarray:
    """uint8 ``[F, H, W, C]`` from a PNG file, a folder of PNG frames or an mp4 file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        assert files, f"{path} holds no PNG frames"
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    if path.suffix == ".png":
        return np.asarray(Image.open(path).convert("RGB"))[None]
    import imageio.v3 as iio

    return np.asarray(iio.imread(path, plugin="FFMPEG"))


def assert_has_content(frames: np.ndarray) -> None:
    """Fails for a saturated (all 255 / all 0) or constant picture: real renders vary and sit mostly inside the
    range."""
    frames = np.asarray(frames)
    assert frames.dtype == np.uint8, frames.dtype
    for i, f in enumerate(frames):
        saturated = float(np.mean((f == 0) | (f == 255)))
        assert saturated < 0.5, f"frame {i}: {saturated:.0%} of its pixels are 0 or 255"
        assert float(f.std()) > 2.0, f"frame {i} is (nearly) constant: std {float(f.std()):.2f}"


def assert_matches(written: np.ndarray, expected: np.ndarray, *, lossy: bool) -> None:
    """``written`` (read back from disk) shows ``expected`` (the pipeline's own frames as uint8): exactly for PNG,
    within the codec's error for mp4 (which may pad odd sizes)."""
    assert_has_content(written)
    f, h, w = expected.shape[:3]
    assert written.shape[0] == f, (written.shape, expected.shape)
    written = written[:, :h, :w, :3]
    if not lossy:
        np.testing.assert_array_equal(written, expected)
        return
    err = np.abs(written.astype(np.int16) - expected.astype(np.int16))
    assert float(err.mean()) < 12.0, f"mp4 frames differ from the rendered ones by {float(err.mean()):.1f} on average"
