"""Pictures of attention patterns: a method's token mask drawn as a grayscale image."""
from __future__ import annotations

import torch
from PIL import Image

from attnproc.families import family_named
from attnproc.site import Site


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
