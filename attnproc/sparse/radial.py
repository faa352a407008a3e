"""Radial Attention (mit-han-lab/radial-attention): a static, temporally decaying block mask for video DiTs.

The reference builds one ``B x B``-block mask per video shape (``gen_log_mask_shrinked``): for query frame
``i`` and key frame ``j`` (``d = |i - j|``) a band ``|c - r| <= w(d)`` over the raster-order in-frame indices,
kept only for some frame distances ("decimation"), quantised per frame pair into blocks by a density rule.
:func:`radial_block_mask` reproduces it exactly (``variant="reference"``); ``variant="corrected"`` fixes the
reference's two geometry defects (see ``docs/radial.md``).

    attnproc.apply(pipe, "radial")                    # family defaults (Wan: 1 dense layer, 24% dense steps, decay 0.2)
    attnproc.apply(pipe, "radial", decay=0.5, variant="corrected")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnproc.kernels import BACKENDS, block_sparse_attention, block_to_token_mask
from attnproc.options import option
from attnproc.registry import register
from attnproc.schedule import Schedule

from .base import LRU, SparseMethod

__all__ = ["radial_block_mask", "radial_frame_pair", "RadialConfig", "Radial", "RADIAL_DEFAULTS",
           "SUPPORTED_FAMILIES", "REFERENCE_DECIMATION_THRESHOLD"]

# the reference's frame-decimation threshold, hard-coded to 128 whatever the block size is
REFERENCE_DECIMATION_THRESHOLD = 128
SUPPORTED_FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "ltx")

# Per-family defaults (None options resolve to these). Step counts are fractions so they scale with the loop:
# the reference's 12 of 50 steps is 0.24, Wan 2.2's 11 of 40 is 0.275. "wan22" is picked for a Wan pipeline
# with two experts (transformer_2). CogVideoX and LTX have no reference script: they take the HunyuanVideo
# (joint-attention MMDiT) and Wan (self + cross attention) settings respectively.
RADIAL_DEFAULTS: dict[str, dict] = {
    "wan": dict(dense_first_steps=0.24, dense_first_layers=1, decay=0.2, sink=True),
    "wan22": dict(dense_first_steps=0.275, dense_first_layers=1, decay=0.8, sink=True),
    "hunyuanvideo": dict(dense_first_steps=0.24, dense_first_layers=0, decay=0.95, sink=False),
    "cogvideox": dict(dense_first_steps=0.24, dense_first_layers=0, decay=0.95, sink=False),
    "ltx": dict(dense_first_steps=0.24, dense_first_layers=1, decay=0.2, sink=True),
}

VARIANTS = ("reference", "corrected")


# ---- the mask ----------------------------------------------------------------------------------------------
def radial_frame_pair(distance: int, key_frame: int, tokens_per_frame: int, *, block_size: int = 128,
                      decay: float = 1.0, sink: bool = True, corrected: bool = False) -> tuple[bool, int]:
    """``(kept, half_width)`` of one frame pair: the pair's token mask is ``|c - r| <= half_width`` over the
    in-frame raster indices if ``kept``, empty otherwise (a full frame is ``half_width >= tokens_per_frame``)."""
    S, d = int(tokens_per_frame), abs(int(distance))
    if sink and key_frame == 0:
        return True, S
    pow_s = 2 ** S.bit_length()
    unit = pow_s / 2 ** d.bit_length()  # the reference's "decay_length" without the decay factor
    width = S if d <= 1 else max(float(block_size), unit * decay)
    threshold = block_size if corrected else REFERENCE_DECIMATION_THRESHOLD
    if corrected and d <= 1:
        kept = True
    elif unit >= threshold:
        kept = True
    else:
        kept = d % int(threshold / unit) == 0
    return kept, int(math.floor(width))


def _band_counts(lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor, w: int) -> torch.Tensor:
    """For row ranges ``[lo, hi)`` (broadcast) and columns ``c``: how many rows ``r`` satisfy ``|c - r| <= w``."""
    top = torch.minimum(hi, c + w + 1)
    bottom = torch.maximum(lo, c - w)
    return (top - bottom).clamp_min(0)


def _keep_tiles(counts: torch.Tensor, rows) -> torch.Tensor:
    """The reference's density rule on per-column counts ``[..., tiles, B]``: a column is dense when more than a
    third of the tile's ``rows`` are kept; the tile is kept when more than 60% of its non-empty columns are dense.
    (Integer form of ``count / rows > 1/3`` and ``high / nonzero > 0.6``.)"""
    high = (3 * counts > rows).sum(-1)
    nonzero = (counts > 0).sum(-1)
    return 5 * high > 3 * nonzero


def _reference_mask(F: int, S: int, B: int, decay: float, sink: bool, nb: int) -> torch.Tensor:
    out = torch.zeros(nb, nb, dtype=torch.bool)
    nbs = -(-S // B)  # blocks per frame pair canvas
    M = nbs * B
    tiles = torch.arange(nbs)
    cols = torch.arange(M)
    memo: dict = {}
    for i in range(F):
        rr = (i * S) % B
        for j in range(F):
            kept, w = radial_frame_pair(i - j, j, S, block_size=B, decay=decay, sink=sink)
            if not kept:
                continue
            rc = (j * S) % B
            key = (rr, rc, min(w, S))
            blk = memo.get(key)
            if blk is None:
                # canvas rows aB..aB+B-1 hold frame rows r = R - rr in [0, S); canvas columns C hold c = C - rc
                lo = (tiles * B - rr).clamp(0, S)[:, None]
                hi = (tiles * B + B - rr).clamp(0, S)[:, None]
                c = cols - rc
                cnt = _band_counts(lo, hi, c[None, :], min(w, S))
                cnt = torch.where(((c >= 0) & (c < S))[None, :], cnt, torch.zeros_like(cnt))
                blk = memo[key] = _keep_tiles(cnt.reshape(nbs, nbs, B), B)
            r0, c0 = (i * S) // B, (j * S) // B
            out[r0:r0 + nbs, c0:c0 + nbs] |= blk[: nb - r0, : nb - c0]
    return out


def _corrected_mask(F: int, S: int, B: int, decay: float, sink: bool, nb: int) -> torch.Tensor:
    """The band mask over the real sequence, quantised once per block of the real sequence (no per-pair canvas,
    so nothing is cropped), rows of a partial last block counted as they are."""
    N = F * S
    nbv = -(-N // B)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    c = torch.arange(S)
    pairs = [[radial_frame_pair(i - j, j, S, block_size=B, decay=decay, sink=sink, corrected=True)
              for j in range(F)] for i in range(F)]
    for a in range(nbv):
        r0, r1 = a * B, min(a * B + B, N)
        counts = torch.zeros(F, S, dtype=torch.long)
        for i in range(r0 // S, (r1 - 1) // S + 1):
            lo, hi = max(r0 - i * S, 0), min(r1 - i * S, S)
            for j in range(F):
                kept, w = pairs[i][j]
                if kept:
                    counts[j] += _band_counts(torch.tensor(lo), torch.tensor(hi), c, min(w, S))
        flat = torch.nn.functional.pad(counts.reshape(-1), (0, nbv * B - N))
        out[a, :nbv] = _keep_tiles(flat.reshape(nbv, B), r1 - r0)
    return out


def _mask(F, S, B, decay, sink, text, variant):
    N = F * S
    nb = -(-(N + text) // B)
    if variant == "reference":
        out = _reference_mask(F, S, B, decay, sink, nb)
        border = N // B
    else:
        out = _corrected_mask(F, S, B, decay, sink, nb)
        border = N // B if text else nb
    out[border:, :] = True
    out[:, border:] = True
    return out


def radial_block_mask(frames: int, tokens_per_frame: int, *, block_size: int = 128, decay: float = 1.0,
                      sink: bool = True, text_tokens: int = 0, variant: str = "reference") -> torch.Tensor:
    """Radial Attention's block mask, bool ``[nb, nb]`` with ``nb = ceil((frames*tokens_per_frame + text_tokens)
    / block_size)`` (True = the query block attends the key block), over frame-major tokens followed by text.

    ``variant="reference"`` reproduces ``gen_log_mask_shrinked`` of mit-han-lab/radial-attention (HEAD
    ``72788d4``) exactly: power-of-two band widths ``max(B, 2^bl(S) * decay / 2^bl(d))`` (full frames for
    ``d <= 1``), frame-pair decimation with its hard-coded 128 threshold, per-pair shrinking with the 1/3 and 0.6
    rule, and every block row/column from ``N // block_size`` on forced dense. ``sink=True`` (attention sink on
    the first frame) is its Wan behaviour, ``sink=False`` its HunyuanVideo behaviour.

    ``variant="corrected"``: decimation against ``block_size`` and never of adjacent frames, and the density rule
    applied once over the real sequence (no frame pair partly dropped when ``tokens_per_frame`` is not a multiple
    of ``block_size``; only blocks holding text are forced dense). Returns a CPU tensor.
    """
    for name, val in (("frames", frames), ("tokens_per_frame", tokens_per_frame), ("block_size", block_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"radial_block_mask: {name} must be a positive int, got {val!r}")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"radial_block_mask: text_tokens must be an int >= 0, got {text_tokens!r}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not math.isfinite(decay) or decay <= 0:
        raise ValueError(f"radial_block_mask: decay must be a finite number > 0, got {decay!r}")
    if variant not in VARIANTS:
        raise ValueError(f"radial_block_mask: variant must be one of {VARIANTS}, got {variant!r}")
    return _mask(int(frames), int(tokens_per_frame), int(block_size), float(decay), bool(sink), int(text_tokens),
                 variant)


# ---- the method --------------------------------------------------------------------------------------------
@dataclass
class RadialConfig(Schedule):
    """Radial Attention options. ``None`` means the model family's reference default (see ``RADIAL_DEFAULTS``)."""

    dense_first_steps: float | None = option(
        None, low=0, high=10000,
        help="run dense for the first N steps (< 1: a fraction of the steps); default: the family's (Wan 0.24)")
    dense_first_layers: int | None = option(
        None, low=0, high=10000, help="run dense in the first N blocks; default: the family's (Wan 1, Hunyuan 0)")
    decay: float | None = option(None, low=0, high=100,
                                 help="band width decay factor (> 0); default: the family's (Wan 0.2, Hunyuan 0.95)")
    sink: bool | None = option(None, help="first frame as attention sink; default: the family's (Wan on, Hunyuan off)")
    block_size: int = option(128, low=16, high=1024, help="block size of the mask and kernel")
    variant: str = option("reference", choices=VARIANTS,
                          help="'reference' mask (exact parity) or 'corrected' (fixes its geometry defects)")
    backend: str = option("auto", choices=BACKENDS, help="block-sparse kernel backend")

    def validate(self):
        if self.decay is not None and not self.decay > 0:
            raise ValueError(f"decay must be > 0 (it scales the band widths), got {self.decay}")


@register
class Radial(SparseMethod):
    """Radial Attention: static O(n log n) block mask, energy decaying with temporal distance."""

    name = "radial"
    summary = "Radial Attention: static temporally-decaying block-sparse mask for video DiTs (Wan, Hunyuan, ...)."
    Config = RadialConfig
    families = SUPPORTED_FAMILIES
    defaults = RADIAL_DEFAULTS
    sparse_kinds = ("self", "joint")
    context_parallel = frozenset({"ulysses", "ring"})  # pattern from the layout (docs/context_parallel.md)

    def __init__(self, config=None):
        super().__init__(config)
        self._masks = LRU(32)

    def visual_block_mask(self, cfg: RadialConfig, layout, device) -> torch.Tensor:
        """bool ``[ceil(N/B), ceil(N/B)]`` over the visual tokens (cached per shape, parameters and device)."""
        key = (layout.frames, layout.tokens_per_frame, cfg.block_size, cfg.decay, cfg.sink, cfg.variant, str(device))
        return self._masks.get_or(key, lambda: radial_block_mask(
            layout.frames, layout.tokens_per_frame, block_size=cfg.block_size, decay=cfg.decay, sink=cfg.sink,
            variant=cfg.variant).to(device))

    def block_mask_for(self, site) -> tuple[torch.Tensor, int]:
        """``(block_mask [nb, nb] over the visual tokens, block_size)`` at ``site``, ignoring the schedule."""
        cfg = self.config_for(site)
        return self.visual_block_mask(cfg, site.require_layout(self.name), "cpu"), cfg.block_size

    def visual_token_mask(self, config, layout, site):
        N = layout.visual_len
        return block_to_token_mask(self.visual_block_mask(config, layout, "cpu"), config.block_size, N, N)

    def visual_block_pattern(self, config, layout, site):
        return self.visual_block_mask(config, layout, "cpu"), torch.arange(layout.visual_len) // config.block_size

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        bm = self.visual_block_mask(config, layout, q.device)[None, None]
        return block_sparse_attention(q, k, v, bm, config.block_size, scale=scale, extra_k=extra_k, extra_v=extra_v,
                                      backend=config.backend)
