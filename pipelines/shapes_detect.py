"""Detector for the shapes world: coloured blobs → colour, kind, box; tracks → motion.

Pure numpy. Works on what a pipeline writes: uint8 or float ([0, 1] or [-1, 1]) pixels, HWC or
CHW. The background colour is read from the image border, foreground pixels are those far from
it, each is given the nearest palette colour, and connected regions of one colour are shapes.
The kind is the world's shape (square, disc, upright triangle), placed and sized freely, that
overlaps the blob best; a blob that no shape overlaps by ``MIN_FIT`` (IoU), whose proportions are
outside ``SPREAD_RANGE``, or that two kinds fit equally well, is "unclear". Fitting
whole shapes, not thresholds on one statistic, is what keeps the kind right on decoded images:
a VAE rounds corners and bleeds a pixel of fringe, which moved the old fill-of-box rule across its
thresholds on 7 % of the shapes of held-out reconstructions (see ``benchmarks/shapes_vae.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, KINDS, _STEP, _mask

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
# A blob that no shape of the world overlaps by this IoU is no shape ("unclear"). Clean dataset
# shapes fit ≈ 1 and VAE reconstructions of held-out samples ≥ 0.85 (0.5th percentile), so only
# shapeless smears, merged shapes and strongly stretched blobs fall under it.
MIN_FIT = 0.75
# IoU cannot tell a stretched blob from a disc: a square and a disc overlap by 0.85, so a 1.4 : 1
# rectangle still fits a disc by > 0.75. Every world shape has the proportions of a square box: the
# spread of its pixels across over along (std x / std y) is 1 for squares and discs and 0.87 for
# triangles (0.80–1.12 on VAE reconstructions, 0.5th–99.5th percentile). Outside this range: "unclear".
SPREAD_RANGE = (0.69, 1.25)


@dataclass(frozen=True)
class Blob:
    colour: str
    kind: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    area: int
    fit: float = 1.0  # IoU of the best-fitting world shape's placement over the blob (for "unclear" too)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def aspect(self) -> float:
        """Width over height of the box: ≈ 1 for every shape the world draws (they sit in square boxes)."""
        return (self.box[2] - self.box[0]) / (self.box[3] - self.box[1])

    @property
    def fill(self) -> float:
        """How much of its box the blob covers: square ≈ 1, disc ≈ π/4, triangle ≈ 1/2."""
        return self.area / ((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


@dataclass(frozen=True)
class Track:
    colour: str
    kind: str  # the kind seen most often along the track
    motion: str  # left / right / up / down / staying
    centres: tuple[tuple[float, float], ...]  # per frame where seen


def to_uint8_hwc(image) -> np.ndarray:
    """Accept uint8/float, [0,1] or [-1,1], HWC or CHW, numpy/torch/PIL; return uint8 HWC."""
    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if a.ndim != 3:
        raise ValueError(f"image must have 3 dims (HWC or CHW), got shape {a.shape}")
    if a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = a.transpose(1, 2, 0)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.min() < -0.01:
            a = (a + 1) / 2
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    return a


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices (flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for start in np.flatnonzero(mask):
        if seen.flat[start]:
            continue
        stack, members = [start], []
        seen.flat[start] = True
        while stack:
            i = stack.pop()
            members.append(i)
            y, x = divmod(i, w)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append(ny * w + nx)
        out.append(np.array(members))
    return out


def _first_guess(kind: str, mask: np.ndarray) -> tuple[float, float, float]:
    """Centre and side of ``kind`` with the blob's centroid and area (a triangle's centroid sits at 2/3 height)."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    side = {"square": np.sqrt(area), "circle": 2 * np.sqrt(area / np.pi), "triangle": np.sqrt(2 * area)}[kind]
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    return cx, cy - side / 6 if kind == "triangle" else cy, side


def _fit(kind: str, mask: np.ndarray) -> float:
    """IoU of the world's ``kind`` over the square boolean ``mask`` at the best placement a greedy
    search finds: moves of the centre by 1 or ½ px and of the side by 5 or 10 %, started from the
    blob's moments (pixel-centre sampling makes ½-px moves alone stall on plateaus)."""
    size = mask.shape[0]

    def iou(p):
        cx, cy, side = p
        shape = _mask(kind, size, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        return (shape & mask).sum() / max((shape | mask).sum(), 1)

    best = _first_guess(kind, mask)
    score = iou(best)
    while True:
        cx, cy, side = best
        moves = [m for d in (1.0, 0.5) for m in ((cx - d, cy, side), (cx + d, cy, side), (cx, cy - d, side),
                                                 (cx, cy + d, side))]
        moves += [(cx, cy, side * f) for f in (0.9, 0.95, 1.05, 1.1)]
        scores = [iou(m) for m in moves]
        i = int(np.argmax(scores))
        if scores[i] <= score:
            return float(score)
        best, score = moves[i], scores[i]


def _classify(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float]:
    """(kind, fit) of the blob ``mask`` (full image) inside ``box``: the best-fitting shape, or "unclear"."""
    x0, y0, x1, y1 = box
    pad = 4  # room for the fitted shape to grow past the blob's box
    side = max(x1 - x0, y1 - y0) + 2 * pad
    crop = np.zeros((side, side), dtype=bool)
    part = mask[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad]
    oy, ox = max(0, y0 - pad) - (y0 - pad), max(0, x0 - pad) - (x0 - pad)
    crop[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    fits = {kind: _fit(kind, crop) for kind in KINDS}
    best, second = sorted(fits.values(), reverse=True)[:2]
    kind = max(fits, key=fits.get)
    ys, xs = np.nonzero(crop)
    spread = np.sqrt(xs.var() / max(ys.var(), 1e-9))
    clear = best >= MIN_FIT and best > second and SPREAD_RANGE[0] <= spread <= SPREAD_RANGE[1]
    return (kind if clear else "unclear"), best  # a tie (a blob of a few pixels is square and disc alike) is unclear


def detect(image, min_area_frac: float = 0.008, fg_threshold: float = 60.0) -> list[Blob]:
    """Blobs of ``image``, largest first. Blobs under ``min_area_frac`` of the image are noise."""
    a = to_uint8_hwc(image).astype(np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.linalg.norm(a - bg, axis=-1) > fg_threshold
    nearest = np.argmin(np.linalg.norm(a[:, :, None, :] - _PALETTE, axis=-1), axis=-1)
    blobs = []
    min_area = max(4, int(min_area_frac * h * w))
    for c, name in enumerate(_NAMES):
        for comp in _components(fg & (nearest == c)):
            if comp.size < min_area:
                continue
            ys, xs = np.divmod(comp, w)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            mask = np.zeros((h, w), dtype=bool)
            mask.flat[comp] = True
            kind, fit = _classify(mask, box)
            blobs.append(Blob(name, kind, box, int(comp.size), fit))
    return sorted(blobs, key=lambda b: -b.area)


def direction(dx: float, dy: float, min_shift: float) -> str:
    """Name of the displacement (dx, dy): the dominant axis, or "staying" if under ``min_shift``."""
    if max(abs(dx), abs(dy)) < min_shift:
        return "staying"
    return ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")


def track(frames, min_shift_frac: float = 0.08, **detect_kw) -> list[Track]:
    """Follow each colour's largest blob through ``frames`` and name its motion.

    The motion is the displacement between the mean centres of the first and last quarter of
    the frames where the colour is seen; under ``min_shift_frac`` of the width it is "staying".
    """
    per_frame = [detect(f, **detect_kw) for f in frames]
    width = to_uint8_hwc(frames[0]).shape[1]
    tracks = []
    for name in _NAMES:
        seen = [(i, next(b for b in bl if b.colour == name)) for i, bl in enumerate(per_frame)
                if any(b.colour == name for b in bl)]
        if len(seen) < max(2, len(per_frame) // 2):
            continue
        centres = np.array([b.centre for _, b in seen])
        q = max(1, len(seen) // 4)
        dx, dy = centres[-q:].mean(0) - centres[:q].mean(0)
        kinds = [b.kind for _, b in seen]
        kind = max(kinds, key=kinds.count)  # a tie goes to the kind seen first (not to set order, which varies by process)
        tracks.append(Track(name, kind, direction(dx, dy, min_shift_frac * width), tuple(map(tuple, centres))))
    return tracks


def parse_caption(text: str) -> list[dict]:
    """The shapes a caption of the grammar asks for: [{"colour", "kind", "motion"}]."""
    out = []
    for part in text.replace(",", " and").split(" and "):
        words = part.split()
        colour = next((w for w in words if w in COLOURS), None)
        kind = next((w for w in words if w in ("circle", "square", "triangle")), None)
        motion = "staying"
        if "moving" in words:
            nxt = words[words.index("moving") + 1:]
            motion = nxt[0] if nxt and nxt[0] in _STEP else "staying"
        if colour or kind:
            out.append({"colour": colour, "kind": kind, "motion": motion})
    return out


def verdict(prompt: str, media) -> dict:
    """Does ``media`` (one image, or a list of frames) show what ``prompt`` asks for?

    Per asked shape: colour found, kind right, motion right (videos); plus the count check.
    """
    asked = parse_caption(prompt)
    frames = list(media) if isinstance(media, (list, tuple)) or np.asarray(media).ndim == 4 else [media]
    video = len(frames) > 1
    if video:
        found = [{"colour": t.colour, "kind": t.kind, "motion": t.motion} for t in track(frames)]
    else:
        found = [{"colour": b.colour, "kind": b.kind, "motion": "staying"} for b in detect(frames[0])]
    per = []
    for want in asked:
        got = next((f for f in found if f["colour"] == want["colour"]), None)
        per.append({
            "asked": want,
            "colour": got is not None,
            "kind": got is not None and got["kind"] == want["kind"],
            "motion": got is not None and got["motion"] == want["motion"],
        })
    return {
        "prompt": prompt,
        "found": found,
        "shapes": per,
        "colour": all(p["colour"] for p in per),
        "kind": all(p["kind"] for p in per),
        "motion": all(p["motion"] for p in per) if video else None,
        "count": len(found) == len(asked),
    }


def kinds_read_right(images, samples) -> tuple[int, int]:
    """(right, total) over the ground-truth shapes of dataset ``samples``: how many of them the detector finds
    in its colour with its kind on ``images`` (e.g. their VAE decodings), the detector's check where truth is known."""
    right = total = 0
    for image, sample in zip(images, samples):
        blobs = detect(image)
        for shape in sample.shapes:
            blob = next((b for b in blobs if b.colour == shape.colour), None)
            right += blob is not None and blob.kind == shape.kind
            total += 1
    return right, total

