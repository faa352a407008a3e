"""Region inputs of mask-guided edits: parsing, mask coercion, per-grid resizing and compositing.

A region is a phrase (a substring of the prompt) and a mask at image / video resolution. This module turns the
user's description into tensors and resamples them to the token grid of each attention call. It knows nothing
of pipelines (phrase → token positions needs the pipeline's tokenizer: ``attnproc.pipelines.regions``).

Rules (documented in docs/maskmod.md):

* a mask is a 2-D ``[H, W]`` array/tensor, a 3-D ``[F, H, W]`` one (one mask per frame), a PIL image, an image
  file path, or a list of per-frame items of those kinds; values in [0, 1] (bool, float, or uint8 0/255) are
  region coverage, image files are binarised at 50 % grey (alpha channel if the image has one);
* ``box = [x0, y0, x1, y1]`` in fractions of the width/height is a rectangle mask (all frames);
* overlapping regions are layered: a region listed later lies on top of the earlier ones (soft masks blend
  like alpha compositing), so every token's region weights sum to at most 1;
* masks are resampled to each call's token grid by area averaging (a token's weight is the fraction of it the
  mask covers); frames map to latent frames 1:1, from one mask for all frames, or by the VAE's causal temporal
  grouping (``T = r·(F − 1) + 1`` pixel frames: frame 0 alone, then groups of ``r``) or plain groups
  (``T = r·F``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Region:
    """One parsed region: its phrase, its mask ``[T, H, W]`` (float in [0, 1]; ``None`` for a box), its box,
    and the text-token positions its phrase occupies (filled in by ``bind`` or given by the user)."""

    phrase: str | None
    mask: torch.Tensor | None = None
    box: tuple[float, float, float, float] | None = None
    tokens: list[int] | None = None
    index: int = 0

    @property
    def frames(self) -> int:
        return 1 if self.mask is None else int(self.mask.shape[0])

    def describe(self) -> str:
        return f"region {self.index}" + (f" ({self.phrase!r})" if self.phrase else "")


def to_mask(x: Any, where: str) -> torch.Tensor:
    """One mask item → float tensor [T, H, W] in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        return _load_image_mask(x, where)[None]
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(x, Image.Image):
        return _pil_mask(x)[None]
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{where}: an empty list of mask frames")
        if all(isinstance(e, (int, float, bool)) for e in x):
            raise ValueError(f"{where}: a mask must be 2-D [H, W] or 3-D [F, H, W], got a flat list of numbers")
        if all(isinstance(e, (list, tuple)) and e and all(isinstance(v, (int, float, bool)) for v in e) for e in x):
            return to_mask(torch.tensor(x, dtype=torch.float32), where)  # a nested list = one 2-D mask
        frames = [to_mask(e, f"{where}, frame {i}") for i, e in enumerate(x)]
        if any(f.shape[0] != 1 for f in frames):
            raise ValueError(f"{where}: a list of frames must hold 2-D masks (got a 3-D item)")
        shapes = {tuple(f.shape[1:]) for f in frames}
        if len(shapes) > 1:
            raise ValueError(f"{where}: mask frames differ in size: {sorted(shapes)}")
        return torch.cat(frames)
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is not None and isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        else:
            raise ValueError(f"{where}: a mask must be an image file path, a PIL image, a numpy array or a torch "
                             f"tensor (or a list of per-frame ones), got {type(x).__name__}")
    t = x.detach().cpu()
    if t.dtype == torch.uint8 and t.numel() and int(t.max()) > 1:
        t = t.float() / 255.0
    t = t.float()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"{where}: a mask array must be [H, W] or [F, H, W], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{where}: an empty mask array of shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{where}: mask values must lie in [0, 1] (bool, float, or uint8 0/255)")
    return t.contiguous()


def _pil_mask(img) -> torch.Tensor:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            grey = alpha
        else:
            grey = img.convert("L")
    else:
        grey = img.convert("L")
    data = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(grey.height, grey.width)
    return (data >= 128).float()


def _load_image_mask(path, where: str) -> torch.Tensor:
    from PIL import Image

    if not os.path.exists(path):
        raise ValueError(f"{where}: mask file {os.fspath(path)!r} does not exist")
    with Image.open(path) as img:
        return _pil_mask(img)


def parse_regions(spec: Any) -> list[Region]:
    """The user's region description → :class:`Region` list, with clear errors.

    ``spec`` is a list of dicts ``{"phrase": str, "mask": …}`` (or ``"box": [x0, y0, x1, y1]`` instead of a
    mask; optional ``"tokens": [int, …]`` to give the text-token positions directly), a list of
    ``(phrase, mask)`` pairs, or the same as a JSON string.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"regions: a string must be JSON (a list of {{'phrase': ..., 'mask': ...}}): {e}") from None
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        raise ValueError("regions: give at least one region, e.g. regions=[{'phrase': 'a red fox', "
                         "'mask': 'fox.png'}]")
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"regions must be a list of {{'phrase': ..., 'mask': ...}} dicts, got {type(spec).__name__}")
    regions = []
    for i, item in enumerate(spec):
        where = f"region {i}"
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            item = {"phrase": item[0], "mask": item[1]}
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a dict {{'phrase': ..., 'mask': ...}} or a (phrase, mask) pair, "
                             f"got {type(item).__name__}")
        unknown = sorted(set(item) - {"phrase", "mask", "box", "tokens"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: phrase, mask, box, tokens")
        phrase = item.get("phrase")
        tokens = item.get("tokens")
        if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
            raise ValueError(f"{where}: 'phrase' must be a non-empty string, got {phrase!r}")
        if phrase is None and tokens is None:
            raise ValueError(f"{where}: give a 'phrase' (a part of the prompt) or explicit 'tokens'")
        if tokens is not None:
            if (not isinstance(tokens, (list, tuple)) or not tokens
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
                raise ValueError(f"{where}: 'tokens' must be a non-empty list of text-token positions (ints >= 0)")
            tokens = sorted(set(int(t) for t in tokens))
        has_mask, has_box = item.get("mask") is not None, item.get("box") is not None
        if has_mask == has_box:
            raise ValueError(f"{where}{f' ({phrase!r})' if phrase else ''}: give exactly one of 'mask' or 'box'")
        region = Region(phrase=phrase.strip() if phrase else None, tokens=tokens, index=i)
        if has_box:
            box = item["box"]
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                raise ValueError(f"{where}: 'box' must be [x0, y0, x1, y1] in fractions of width and height")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"{where}: 'box' {list(box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
            region.box = (x0, y0, x1, y1)
        else:
            region.mask = to_mask(item["mask"], where)
            if float(region.mask.max()) <= 0:
                raise ValueError(f"{region.describe()}: the mask is empty (no pixel is in the region)")
        regions.append(region)
    frames = {r.frames for r in regions} - {1}
    if len(frames) > 1:
        detail = ", ".join(f"{r.describe()}: {r.frames}" for r in regions)
        raise ValueError(f"frame count mismatch between regions: every mask must have one frame or the same "
                         f"number of frames ({detail})")
    return regions


def check_phrases(regions: list[Region], prompt: str) -> None:
    """Every phrase must occur in the prompt (case-insensitively); the error names the phrase."""
    for r in regions:
        if r.phrase is None:
            continue
        if r.phrase not in prompt and r.phrase.lower() not in prompt.lower():
            raise ValueError(f"phrase {r.phrase!r} ({r.describe()}) is not in the prompt {prompt!r}; each "
                             "region's phrase must be a part of the full prompt")


# ---------------------------------------------------------------------------------------------------------
def map_frames(mask: torch.Tensor, frames: int, where: str) -> torch.Tensor:
    """[T, H, W] → [frames, H, W]: identity, broadcast, causal-VAE grouping or plain grouping (mean)."""
    t = mask.shape[0]
    if t == frames:
        return mask
    if t == 1:
        return mask.expand(frames, -1, -1)
    if frames > 1 and (t - 1) % (frames - 1) == 0:
        r = (t - 1) // (frames - 1)
        rest = mask[1:].reshape(frames - 1, r, *mask.shape[1:]).mean(1)
        return torch.cat([mask[:1], rest])
    if t % frames == 0:
        return mask.reshape(frames, t // frames, *mask.shape[1:]).mean(1)
    raise ValueError(
        f"frame count mismatch: {where} has {t} mask frames but the video has {frames} latent frames; give 1 "
        f"mask, {frames} masks (one per latent frame) or one per video frame (e.g. {4 * (frames - 1) + 1} for a "
        "VAE that compresses time by 4)")


def resize_to_grid(mask: torch.Tensor, height: int, width: int, where: str) -> torch.Tensor:
    """[F, H, W] → [F, height, width] by area averaging; a clear error if the aspect ratios cannot match."""
    fh, fw = mask.shape[-2:]
    if (fh, fw) == (height, width):
        return mask
    expected_h = fw * height / width  # the mask height that matches the grid's aspect ratio
    if abs(fh - expected_h) > max(fh / height, 0.02 * fh, 1.0):  # more than one token row off
        raise ValueError(
            f"{where}: mask of {fw}x{fh} (WxH) does not match the aspect ratio of the {width}x{height} token grid "
            f"(expected about {fw}x{round(expected_h)}); give masks at the image size")
    return F.adaptive_avg_pool2d(mask[:, None], (height, width))[:, 0]


def box_mask(box, frames: int, height: int, width: int) -> torch.Tensor:
    """Area coverage of a fractional box on a ``height × width`` grid (exact per token)."""
    x0, y0, x1, y1 = box

    def cover(lo, hi, n):
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(
            min=0) * n

    m = cover(y0, y1, height)[:, None] * cover(x0, x1, width)[None, :]
    return m.float().clamp(0, 1)[None].expand(frames, -1, -1)


@dataclass
class GridMaps:
    """Region weights on one token grid: ``weights [N, F·h·w]`` (layered, per token sums ≤ 1) and ``area [F·h·w]``
    (the region size each token belongs to, as a fraction of its frame, weighted by coverage)."""

    weights: torch.Tensor
    area: torch.Tensor
    cache: dict = field(default_factory=dict)  # derived masks (self / cross) by key


def grid_maps(regions: list[Region], frames: int, height: int, width: int) -> GridMaps:
    covers = []
    for r in regions:
        if r.box is not None:
            c = box_mask(r.box, frames, height, width)
        else:
            c = resize_to_grid(map_frames(r.mask, frames, r.describe()), height, width, r.describe())
        covers.append(c.reshape(frames, height * width).float())
    weights = [None] * len(covers)
    remaining = torch.ones_like(covers[0])
    for n in range(len(covers) - 1, -1, -1):  # later regions lie on top
        weights[n] = covers[n] * remaining
        remaining = remaining * (1 - covers[n])
    w = torch.stack(weights)  # [N, F, hw]
    area_n = w.mean(-1, keepdim=True)  # [N, F, 1]: fraction of each frame
    area = (w * area_n).sum(0)  # [F, hw]
    return GridMaps(w.reshape(len(covers), -1), area.reshape(-1))
