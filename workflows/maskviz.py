"""Pictures of attention patterns: a method's token mask drawn as a grayscale image, with a legend."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

from attnproc.families import family_named
from attnproc.site import Site

LEGEND = ("white = query-key pair computed, black = skipped (grey: kept by some heads)",
          "rows = queries, columns = keys, in token order")


def mask_image(mask: torch.Tensor, max_side: int = 512) -> Image.Image:
    """A bool ``[Q, K]`` (or ``[H, Q, K]``, heads averaged) mask as an image: white = kept, cells averaged down to
    at most ``max_side`` pixels a side."""
    m = mask.float()
    if m.ndim == 3:
        m = m.mean(dim=0)
    q, k = m.shape
    fq, fk = max(1, -(-q // max_side)), max(1, -(-k // max_side))
    if fq > 1 or fk > 1:
        m = torch.nn.functional.pad(m, (0, (-k) % fk, 0, (-q) % fq))
        m = m.reshape(m.shape[0] // fq, fq, m.shape[1] // fk, fk).mean(dim=(1, 3))
    return Image.fromarray((m.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")


def legend_image(mask: torch.Tensor, caption: str = "", size: int = 384) -> Image.Image:
    """:func:`mask_image` scaled to ``size`` x ``size`` (nearest), above a legend strip: a white and a black
    swatch with what they mean, the axes, and ``caption`` (density, grid)."""
    pattern = mask_image(mask, max_side=size).resize((size, size), Image.NEAREST).convert("RGB")
    font = ImageFont.load_default()
    lines = [LEGEND[0], LEGEND[1]] + textwrap.wrap(caption, width=max(20, size // 6))
    line_h = 12
    strip = 8 + line_h * (len(lines) + 1)
    canvas = Image.new("RGB", (size, size + strip), (235, 235, 235))
    canvas.paste(pattern, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = size + 4
    draw.rectangle((4, y, 14, y + 9), fill=(255, 255, 255), outline=(128, 128, 128))
    draw.text((18, y - 1), "computed", fill=(0, 0, 0), font=font)
    draw.rectangle((90, y, 100, y + 9), fill=(0, 0, 0), outline=(128, 128, 128))
    draw.text((104, y - 1), "skipped", fill=(0, 0, 0), font=font)
    for i, line in enumerate(lines):
        draw.text((4, y + line_h * (i + 1)), line, fill=(0, 0, 0), font=font)
    return canvas


def method_mask(method, family: str, layout, kind: str = "self") -> torch.Tensor | None:
    """The method's sparsity pattern for a full-resolution self/joint call with ``layout``, or None if it keeps
    every pair (dense, or a method without a static pattern)."""
    fam = family_named(family)  # a family name or an alias ("wan21")
    if kind == "joint" and fam.joint_text == "none":
        kind = "self"
    site_layout = fam.site_layout(layout, kind, layout.visual_len, layout.visual_len)
    site = Site(family=fam.name, denoiser=None, name=None, index=None, layer=None, kind=kind, layout=site_layout,
                step=None)
    n = site_layout.seq_len
    return method.token_mask(site, n, n)


def handle_mask(handle) -> tuple[torch.Tensor | None, str] | None:
    """``(mask, caption)`` for an applied method at the layout its first denoiser saw last (``mask`` None: every
    pair computed), or None when no layout was seen. The pattern is the method's sparse one, whatever dense
    warm-up its schedule has."""
    layouts = {k: v for k, v in handle.last_layouts().items() if v is not None}
    if not layouts:
        return None
    denoiser, layout = next(iter(layouts.items()))
    mask = method_mask(handle.method, handle.denoisers[denoiser].family, layout)
    where = f"{denoiser}, grid {layout.frames}x{layout.height}x{layout.width}, {layout.visual_len} tokens"
    if mask is None:
        return None, f"every query-key pair computed (dense); {where}"
    return mask, f"density {float(mask.float().mean()):.3f}; {where}"
