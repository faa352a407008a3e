"""Rectified SpaAttn (BienLuky/Rectified-SpaAttn): block-sparse attention corrected by pooled attention.

Tokens are ordered along a Gilbert curve so that each block of ``block_size`` tokens is a compact 3-D patch.
Pooled (block-mean) queries and keys give a block-level estimate ``P`` of the full attention. Per query block:

* critical blocks: the shortest prefix of ``P`` (descending) whose running sum passes ``p_remain``, at least
  ``top_k = int((1 - drop_rate) * blocks)`` of them, plus the block's grid neighbours and, on Wan, the
  first-frame square; they get exact attention, renormalised among themselves;
* GAPR: a non-critical block whose pooled gain ``|q̄·k̄|`` exceeds the pooling error estimate is approximated
  by ``P_ij * v̄_j``; the mass of the others is folded into the factor ``R`` of the exact part;
* IPAR (joint text, ``variant="hunyuan"``): each text key enters the pooled softmax alone, visual blocks count
  ``block_size`` times, and the text mass joins ``R`` (text keys are always attended exactly).

    out = rectified_attention(q, k, v, block_size=128, drop_rate=0.75, p_remain=0.3)      # reference parity
    rectified_visual_attention(q, k, v, text_k, text_v, scale, config=cfg, layout=layout, layer_index=3)

Pooled statistics run in float32 without the reference's cancelling ``B_s^2`` factor (it overflows fp16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from attnproc.kernels import BACKENDS, block_sparse_attention, dense_attention, num_blocks, pad_to_blocks
from attnproc.options import check_config, option
from attnproc.registry import register
from attnproc.schedule import Schedule

from .base import SparseMethod
from .gilbert import block_neighbors, gilbert_block_neighbors, gilbert_permutation
from .select import keep_first, permutation_partition

__all__ = ["rectified_attention", "rectified_plan", "rectified_visual_attention", "RectifiedConfig", "RECTIFIED_DEFAULTS",
           "SUPPORTED_FAMILIES", "VARIANTS", "RectifiedSpaAttn"]

VARIANTS = ("wan", "hunyuan")
SUPPORTED_FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "ltx", "flux")

# Per-family defaults from the reference scripts (scripts/*.py, Inference.md at commit 4b0aa10). Step counts are
# fractions of the loop: Wan's 10 dense transformer calls are 5 of 50 CFG steps (0.1), CogVideoX's 5 calls are
# 2.5 of 50 (0.05). Joint-attention families (HunyuanVideo, CogVideoX, Flux) use IPAR for their text; Wan and
# LTX (text by cross-attention) use the Wan rules, first-frame square included (LTX has no reference script).
# Flux keeps its last 20 single-stream blocks dense in the reference; our schedule has no "last layers" option.
RECTIFIED_DEFAULTS: dict[str, dict] = {
    "wan": dict(drop_rate=0.75, dense_first_layers=2, dense_first_steps=0.1, first_frame=True),
    "hunyuanvideo": dict(drop_rate=0.8, dense_first_layers=0, dense_first_steps=0.0, first_frame=False),
    "cogvideox": dict(drop_rate=0.85, dense_first_layers=0, dense_first_steps=0.05, first_frame=False),
    "ltx": dict(drop_rate=0.75, dense_first_layers=2, dense_first_steps=0.1, first_frame=True),
    "flux": dict(drop_rate=0.9, dense_first_layers=0, dense_first_steps=0.0, first_frame=False),
}


def _pooled(x: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to whole blocks (as the reference does, so a partial last block's mean is diluted) and return
    ``(blocks [B, H, n, bs, D], means [B, H, n, D])`` in float32."""
    xp, _ = pad_to_blocks(x, bs)
    blocks = xp.float().reshape(*x.shape[:2], -1, bs, x.shape[-1])
    return blocks, blocks.mean(dim=-2)


def rectified_plan(q, k, v, text_k, *, scale, block_size, top_k, p_remain, first_frame_blocks, neighbors, ipar):
    """The selection half of Rectified SpaAttn (everything but the exact attention): ``(critical [B, H, nq, nq],
    R [B, H, nq], approx [B, H, nq, Dv], text_column_selected [B, H, nq] or None)``, all from pooled
    statistics in float32."""
    bs = block_size
    nq = num_blocks(q.shape[2], bs)
    qb, qbar = _pooled(q, bs)
    kb, kbar = _pooled(k, bs)
    _, vbar = _pooled(v, bs)
    raw = torch.matmul(qbar, kbar.transpose(-1, -2))  # [B, H, nq, nq], unscaled (GAPR gain)
    logits = raw * scale
    if ipar:
        te = text_k.shape[2] if text_k is not None else 0
        if te:
            logits = torch.cat([logits, torch.matmul(qbar, text_k.float().transpose(-1, -2)) * scale], dim=-1)
        p = torch.softmax(logits, dim=-1)
        p_vis, p_txt = p[..., :nq], p[..., nq:].sum(-1, keepdim=True)
        denom = p_vis.sum(-1, keepdim=True) * bs + p_txt
        probs = torch.cat([p_vis * bs / denom, p_txt / denom], dim=-1)  # [B, H, nq, nq + 1]
    else:
        probs = torch.softmax(logits, dim=-1)
    # GAPR: the pooled estimate of block j is used only where its gain beats the pooling error
    dq = (qb - qbar[..., None, :]).abs().mean(dim=-2)
    dk = (kb - kbar[..., None, :]).abs().mean(dim=-2)
    err = torch.matmul(dq, kbar.transpose(-1, -2)).abs() + torch.matmul(qbar, dk.transpose(-1, -2)).abs()
    not_rectifiable = ~(raw.abs() > err)
    # critical blocks: cumulative prefix over p_remain, at least top_k, plus neighbours and the first frame
    csum = torch.sort(probs, dim=-1, descending=True, stable=True).values.cumsum(-1)
    count = torch.clamp((csum <= p_remain).sum(-1, keepdim=True) + 1, min=int(top_k))
    crit_all = keep_first(probs, count)
    crit = crit_all[..., :nq].clone()
    if neighbors is not None:
        crit |= neighbors[:nq, :nq].to(crit.device)
    if first_frame_blocks > 0:
        crit[..., :first_frame_blocks, :first_frame_blocks] = True
    kept = crit | not_rectifiable
    p_vis = probs[..., :nq]
    R = (p_vis * kept).sum(-1) + (probs[..., nq] if ipar else 0.0)  # [B, H, nq]
    approx = torch.matmul(p_vis.masked_fill(kept, 0.0), vbar)  # [B, H, nq, Dv]
    return crit, R, approx, (crit_all[..., nq] if ipar else None)


def _rectified(q, k, v, text_k, text_v, *, scale, block_size, top_k, p_remain, first_frame_blocks, neighbors,
               ipar, backend="auto"):
    """Rectified attention of the visual queries; returns ``(out [B, H, N, Dv], critical [B, H, nq, nq],
    text_column_selected [B, H, nq] or None)``."""
    bs, N = block_size, q.shape[2]
    crit, R, approx, text_col = rectified_plan(q, k, v, text_k, scale=scale, block_size=bs, top_k=top_k,
                                               p_remain=p_remain, first_frame_blocks=first_frame_blocks,
                                               neighbors=neighbors, ipar=ipar)
    has_text = ipar and text_k is not None and text_k.shape[2] > 0
    exact = block_sparse_attention(q, k, v, crit, bs, scale=scale, extra_k=text_k if has_text else None,
                                   extra_v=text_v if has_text else None, backend=backend)
    out = exact.float() * R.repeat_interleave(bs, dim=-1)[..., :N, None] \
        + approx.repeat_interleave(bs, dim=-2)[:, :, :N]
    return out.to(q.dtype), crit, text_col


def _check_rates(block_size, drop_rate, p_remain):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1) (1 would drop every block); got {drop_rate!r}")
    if isinstance(p_remain, bool) or not isinstance(p_remain, (int, float)) or not 0 < p_remain <= 1:
        raise ValueError(f"p_remain must be in (0, 1] (pooled probability mass to keep exactly); got {p_remain!r}")


def rectified_attention(q, k, v, *, block_size, drop_rate, p_remain, first_frame_blocks=0, neighbors=None,
                        text_len=0, text_valid=None, variant="wan", return_block_mask=False):
    """Rectified SpaAttn as the reference's attention function computes it, on tokens already in its order.

    ``q, k, v``: ``[B, H, S, D]``. ``variant="wan"``: all ``S`` tokens are visual (``text_len`` must be 0).
    ``variant="hunyuan"``: the sequence is ``[visual | text_len slots]`` of which the first ``text_valid``
    (default all) are real; visual queries get the rectified sparse attention with IPAR, text queries dense
    attention over the visual and valid text keys (invalid text slots are never attended).
    ``top_k = int((1 - drop_rate) * ceil(N_visual / block_size))``; ``neighbors``: bool ``[nb, nb]`` block
    table (``nb >= `` visual blocks) or None; ``first_frame_blocks``: the first blocks attend each other.

    Returns ``[B, H, S, Dv]``; with ``return_block_mask=True`` also the critical mask bool ``[B, H, nq, nk]``
    (``nq`` visual blocks; for ``"hunyuan"`` ``nk = nq + ceil(text_len / block_size)`` with the text blocks
    holding valid text set)."""
    _check_rates(block_size, drop_rate, p_remain)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, S, D] tensor")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must agree in [B, H, S] (and q, k in D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0; got {text_len!r}")
    if variant == "wan" and text_len:
        raise ValueError("variant='wan' has no joint text (text_len must be 0); use variant='hunyuan'")
    S = q.shape[2]
    N = S - text_len
    if N < 1:
        raise ValueError(f"text_len={text_len} leaves no visual token in a sequence of {S}")
    if text_valid is None:
        text_valid = text_len
    if isinstance(text_valid, bool) or not isinstance(text_valid, int) or not 0 <= text_valid <= text_len:
        raise ValueError(f"text_valid must be an int in [0, text_len={text_len}]; got {text_valid!r}")
    nq = num_blocks(N, block_size)
    if isinstance(first_frame_blocks, bool) or not isinstance(first_frame_blocks, int) or \
            not 0 <= first_frame_blocks <= nq:
        raise ValueError(f"first_frame_blocks must be an int in [0, {nq}] (visual blocks); got {first_frame_blocks!r}")
    if neighbors is not None:
        if not isinstance(neighbors, torch.Tensor) or neighbors.dtype != torch.bool or neighbors.dim() != 2 or \
                min(neighbors.shape) < nq:
            raise ValueError(f"neighbors must be a bool [nb, nb] tensor with nb >= {nq} visual blocks; got "
                             f"{getattr(neighbors, 'shape', neighbors)!r}")
    top_k = int((1 - drop_rate) * nq)
    scale = 1.0 / math.sqrt(q.shape[-1])
    vis = slice(0, N)
    tk = k[:, :, N:N + text_valid]
    tv = v[:, :, N:N + text_valid]
    out_v, crit, text_col = _rectified(q[:, :, vis], k[:, :, vis], v[:, :, vis], tk, tv, scale=scale,
                                       block_size=block_size, top_k=top_k, p_remain=p_remain,
                                       first_frame_blocks=first_frame_blocks, neighbors=neighbors,
                                       ipar=variant == "hunyuan")
    if variant == "wan":
        out, mask = out_v, crit
    else:
        keys = torch.cat([k[:, :, vis], tk], dim=2)
        vals = torch.cat([v[:, :, vis], tv], dim=2)
        out_t = dense_attention(q[:, :, N:], keys, vals, scale=scale) if text_len else out_v[:, :, :0]
        out = torch.cat([out_v, out_t.to(out_v.dtype)], dim=2)
        nt = num_blocks(text_len, block_size) if text_len else 0
        mask = torch.zeros(*crit.shape[:3], nq + nt, dtype=torch.bool, device=crit.device)
        mask[..., :nq] = crit
        if nt:
            mask[..., nq] |= text_col
            mask[..., nq:nq + num_blocks(text_valid, block_size)] = True
    return (out, mask) if return_block_mask else out


# ---- config and the visual attention -----------------------------------------------------------------------
@dataclass
class RectifiedConfig(Schedule):
    """Rectified SpaAttn options. ``None`` means the model family's reference default (``RECTIFIED_DEFAULTS``)."""

    dense_first_steps: float | None = option(
        None, low=0, high=10000, help="run dense for the first N steps (< 1: a fraction); default: the family's")
    dense_first_layers: int | None = option(None, low=0, high=10000,
                                            help="run dense in the first N blocks; default: the family's (Wan 2)")
    drop_rate: float | None = option(None, low=0.0, high=0.999,
                                     help="top_k = (1 - drop_rate) x blocks, in [0, 1); default: Wan 0.75, "
                                          "Hunyuan 0.8")
    p_remain: float = option(0.3, low=1e-6, high=1.0,
                             help="pooled probability mass kept exact per query block, (0, 1]")
    block_size: int = option(128, low=16, high=1024, help="tokens per block (queries and keys)")
    first_frame: bool | None = option(None, help="first-frame blocks attend each other (Wan); default: the family's")
    neighbors: bool = option(True, help="always keep the blocks touching the query block on the grid")
    reorder: str = option("gilbert", choices=("gilbert", "raster"),
                          help="token order inside attention: Gilbert curve (reference) or raster")
    backend: str = option("auto", choices=BACKENDS, help="block-sparse kernel backend")

    def validate(self):
        if self.drop_rate is not None and not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1) (1 would drop every block); got {self.drop_rate}")
        if not 0 < self.p_remain <= 1:
            raise ValueError(f"p_remain must be in (0, 1]; got {self.p_remain}")

    def __post_init__(self):  # a bad value is refused when the config is built, as an OptionError
        check_config(self, "rectified")

    def resolved(self, family: str | None = None) -> "RectifiedConfig":
        values = RECTIFIED_DEFAULTS.get(family or "wan", RECTIFIED_DEFAULTS["wan"])
        changes = {k: v for k, v in values.items() if getattr(self, k) is None}
        return replace(self, **changes) if changes else self


def rectified_visual_attention(q, k, v, extra_k, extra_v, scale, *, config: RectifiedConfig, layout,
                               layer_index: int = 0, return_density: bool = False):
    """Rectified SpaAttn over the visual tokens ``[B, H, N, D]`` (frame-major raster order) of ``layout``'s
    grid: Gilbert order, neighbour table and first-frame square from the grid; extra (joint text) keys switch
    IPAR on (HunyuanVideo/CogVideoX/Flux rules), none gives the Wan rules. Returns ``[B, H, N, Dv]``; with
    ``return_density`` also the share of visual (query, key) pairs in critical blocks, computed exactly (the
    rest is GAPR's pooled estimate), so benchmarks can report the density a call achieved."""
    cfg = config.resolved() if config.drop_rate is None or config.first_frame is None else config
    grid = (layout.frames, layout.height, layout.width)
    N, bs = math.prod(grid), cfg.block_size
    if q.shape[2] != N:
        raise ValueError(f"Rectified SpaAttn: {q.shape[2]} visual tokens do not match the grid {grid}")
    perm = gilbert_permutation(grid)[0] if cfg.reorder == "gilbert" else None
    part = permutation_partition(perm, N, bs)
    nq = part.num_chunks
    neighbors = None
    if cfg.neighbors:
        neighbors = gilbert_block_neighbors(grid, bs) if perm is not None else _raster_neighbors(grid, bs)
    ff = nq // grid[0] if cfg.first_frame else 0  # the reference's img_block_num // latent_time
    ipar = extra_k is not None and extra_k.shape[2] > 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, crit, _ = _rectified(part.permute(q), part.permute(k), part.permute(v), extra_k, extra_v, scale=scale,
                              block_size=bs, top_k=int((1 - cfg.drop_rate) * nq), p_remain=cfg.p_remain,
                              first_frame_blocks=ff, neighbors=neighbors, ipar=ipar, backend=cfg.backend)
    if not return_density:
        return part.unpermute(out)
    lengths = torch.tensor(part.lengths, dtype=torch.float64, device=crit.device)
    pairs = (crit.double() * lengths[:, None] * lengths[None, :]).sum() / (crit.shape[0] * crit.shape[1] * N * N)
    return part.unpermute(out), float(pairs)


def _raster_neighbors(grid, bs):
    """The neighbour table for raster order: the same 26-neighbourhood rule on raster-ordered tokens."""
    return block_neighbors(tuple(grid), None, bs)


# ---- the method --------------------------------------------------------------------------------------------
@register
class RectifiedSpaAttn(SparseMethod):
    """Rectified SpaAttn as a method: joint text (HunyuanVideo, CogVideoX, Flux) arrives as extra keys and
    switches IPAR on; self-attention families (Wan, LTX) get the Wan rules. Selection depends on each call's
    queries and keys, so there is no static token mask."""

    name = "rectified"
    summary = "Rectified SpaAttn: pooled-probability block selection with GAPR/IPAR rectification, Gilbert order."
    Config = RectifiedConfig
    families = SUPPORTED_FAMILIES
    defaults = RECTIFIED_DEFAULTS
    sparse_kinds = ("self", "joint")
    context_parallel = frozenset({"ulysses"})  # selection pooled per head over the whole sequence

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        return rectified_visual_attention(q, k, v, extra_k, extra_v, scale, config=config, layout=layout,
                                          layer_index=site.layer or 0)
