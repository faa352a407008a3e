"""The shapes world: procedural images and videos of simple coloured shapes, with ground truth.

Every sample is drawn from a seed (no files): 1–3 shapes (circle, square, triangle) in distinct
colours on a plain light background; in videos each shape moves left/right/up/down or stays.
Its caption comes from a small grammar ("a red circle and a blue square", "a green triangle
moving left", "a yellow square on the left") and its ground truth lists, per shape, colour, kind,
motion and the box in every frame. The detector (:mod:`.shapes_detect`) is tested against it and
the trained shapes pipelines (:mod:`.shapes_models`) learn from it.

    sample = render_sample(seed=3, size=64, frames=17)
    sample.pixels          # uint8 [frames, size, size, 3]
    sample.caption         # "a blue square moving up"
    sample.shapes[0].boxes # one (x0, y0, x1, y1) per frame

Training: ``python -m attnproc.pipelines.shapes train KIND`` (see :mod:`.shapes_train`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Distinct, saturated colours (RGB), far from the background and from each other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "staying")
BACKGROUND: tuple[int, int, int] = (225, 225, 225)

# Words of the caption grammar (they get a token of their own in the shapes tokenizers).
WORDS: tuple[str, ...] = (
    "a", "and", "on", "the", "moving", "staying", "left", "right", "up", "down", "top", "bottom",
    *COLOURS, *KINDS,
)

# Motion direction → unit step (x, y), image coordinates (y grows downwards).
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "staying": (0, 0)}


@dataclass(frozen=True)
class Shape:
    """Ground truth of one shape: what it is, how it moves, its box in every frame."""

    colour: str
    kind: str
    motion: str  # "staying" in images
    boxes: tuple[tuple[float, float, float, float], ...]  # (x0, y0, x1, y1) per frame, pixels


@dataclass(frozen=True)
class Sample:
    """One image (frames = 1) or video of the shapes world."""

    pixels: np.ndarray  # uint8 [frames, size, size, 3]
    caption: str
    shapes: tuple[Shape, ...]


def _phrase(shape: Shape, size: int, video: bool, where: bool) -> str:
    text = f"{shape.colour} {shape.kind}"
    if video and shape.motion != "staying":
        text += f" moving {shape.motion}"
    elif where:
        x0, y0, x1, y1 = shape.boxes[0]
        cx, cy = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size
        if abs(cx - 0.5) >= abs(cy - 0.5):
            text += " on the left" if cx < 0.5 else " on the right"
        else:
            text += " on the top" if cy < 0.5 else " on the bottom"
    return text


def caption(shapes: tuple[Shape, ...], size: int, video: bool, where: bool = False) -> str:
    """The grammar: "a X", "a X and a Y", "a X, a Y and a Z"; X = colour kind [motion | place]."""
    parts = ["a " + _phrase(s, size, video, where) for s in shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _mask(kind: str, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean [size, size] mask of an axis-aligned square, a disc or an upright triangle in ``box``."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "square":
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    # triangle: apex at top centre, base along the bottom of the box
    inside_y = (ys >= y0) & (ys < y1)
    half = (ys - y0) / max(y1 - y0, 1e-6) * r
    return inside_y & (np.abs(xs - cx) <= half)


def _overlaps(a, b, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render_sample(
    seed: int,
    size: int = 64,
    frames: int = 1,
    max_shapes: int = 3,
    where_prob: float = 0.25,
) -> Sample:
    """Draw the sample of ``seed``: deterministic, shapes never overlap in any frame.

    Shapes have sides of 20–34 % of ``size``; in videos each moves ``size``·0.02 px per frame (a
    third of the frame over 17 frames) and stays inside the frame throughout.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not 1 <= max_shapes <= len(COLOURS):
        raise ValueError(f"max_shapes must be in 1..{len(COLOURS)}, got {max_shapes}")
    rng = np.random.default_rng(seed)
    video = frames > 1
    # fewer shapes more often: single shapes are the core of the world
    count = int(rng.choice(np.arange(1, max_shapes + 1), p=_count_probs(max_shapes)))
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    speed = 0.02 * size if video else 0.0
    travel = speed * (frames - 1)
    shapes: list[Shape] = []
    for colour in colours:
        for _ in range(100):  # rejection sampling of a free place
            kind = KINDS[rng.integers(len(KINDS))]
            motion = MOTIONS[rng.integers(len(MOTIONS))] if video else "staying"
            side = float(rng.uniform(0.20, 0.34) * size)
            dx, dy = _STEP[motion]
            lo_x = 1 + (travel if dx < 0 else 0)
            hi_x = size - 1 - side - (travel if dx > 0 else 0)
            lo_y = 1 + (travel if dy < 0 else 0)
            hi_y = size - 1 - side - (travel if dy > 0 else 0)
            if hi_x <= lo_x or hi_y <= lo_y:
                continue
            x0, y0 = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            boxes = tuple(
                (x0 + dx * speed * f, y0 + dy * speed * f, x0 + dx * speed * f + side, y0 + dy * speed * f + side)
                for f in range(frames)
            )
            if all(not _overlaps(b, o, 2.0) for s in shapes for b, o in zip(boxes, s.boxes)):
                shapes.append(Shape(list(COLOURS)[int(colour)], kind, motion, boxes))
                break
    shapes_t = tuple(shapes)
    pixels = np.empty((frames, size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for f in range(frames):
        for s in shapes_t:
            pixels[f][_mask(s.kind, size, s.boxes[f])] = COLOURS[s.colour]
    where = count == 1 and not video and rng.random() < where_prob
    return Sample(pixels, caption(shapes_t, size, video, where), shapes_t)


def _count_probs(max_shapes: int) -> np.ndarray:
    p = np.array([0.5, 0.3, 0.2, 0.1][:max_shapes])
    return p / p.sum()


def batch(seeds, size: int = 64, frames: int = 1, max_shapes: int = 3) -> tuple[np.ndarray, list[str]]:
    """Pixels in [-1, 1], float32 [B, frames, 3, size, size], and captions of ``seeds``."""
    samples = [render_sample(int(s), size, frames, max_shapes) for s in seeds]
    pix = np.stack([s.pixels for s in samples]).astype(np.float32) / 127.5 - 1.0
    return pix.transpose(0, 1, 4, 2, 3), [s.caption for s in samples]


if __name__ == "__main__":  # python -m attnproc.pipelines.shapes train KIND ...
    from .shapes_train import main

    main()
