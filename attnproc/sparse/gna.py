"""Generalized Neighborhood Attention (NATTEN's GNA): each query attends a window of its grid neighbourhood.

Per grid dimension of length ``L`` a query at ``x`` attends keys in a window of ``kernel_size`` tokens (shifted
inward at the borders so every query sees exactly ``kernel_size`` keys); ``stride`` groups of queries share the
window of their group leader; ``dilation`` splits the axis into interleaved groups; ``causal`` windows end at the
query. The N-D mask is the AND of the per-dimension masks. :func:`gna_mask` is that definition; the method runs it
block-sparse on tokens permuted into tiles (exact and fully block-sparse when the mask is tile-aligned, e.g.
stride = tile and a window that is an odd multiple of it; otherwise exact through ``gna_exact``, the window
tested per token inside the kept tiles) with text tokens as extra keys.

    attnproc.apply(pipe, "gna")                                   # family defaults, tile-aligned windows
    attnproc.apply(pipe, "gna", kernel_size=(3, 24, 24), stride=(1, 8, 8))
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from attnproc.kernels import BACKENDS, block_sparse_attention, dense_attention, merge_attention
from attnproc.kernels.sparse import dense_block_sparse
from attnproc.options import option
from attnproc.registry import register
from attnproc.schedule import Schedule

from ._tiles import auto_tile, tile_permutation
from .base import LRU, SparseMethod

__all__ = ["gna_mask", "gna_mask_1d", "gna_window_1d", "gna_tile_masks", "GNAPlan", "gna_plan", "GNAConfig", "GNA",
           "GNA_DEFAULTS", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "ltx", "flux")

# Per-family defaults. Windows are fractions of each (frames, height, width) grid side, from the GNA paper's
# configurations (HunyuanVideo 18x24x24 on 30x48x80, FLUX-4K 80x80 on 256x256), rounded to an odd multiple of
# the tile so the mask is exactly block-sparse; stride = tile. Dense steps: HunyuanVideo 15/50, FLUX 9/28
# (Cosmos-7B 12/35); Wan, CogVideoX and LTX have no published GNA setting and take the HunyuanVideo ones.
GNA_DEFAULTS: dict[str, dict] = {
    "hunyuanvideo": dict(dense_first_steps=0.3, window=(0.6, 0.5, 0.3)),
    "wan": dict(dense_first_steps=0.3, window=(0.6, 0.5, 0.3)),
    "cogvideox": dict(dense_first_steps=0.3, window=(0.6, 0.5, 0.3)),
    "ltx": dict(dense_first_steps=0.3, window=(0.6, 0.5, 0.3)),
    "flux": dict(dense_first_steps=9 / 28, window=(1.0, 0.3125, 0.3125)),
}


# ---- the mask ----------------------------------------------------------------------------------------------
def _per_dim(value, nd: int, name: str, kind=int) -> tuple:
    if isinstance(value, (list, tuple)):
        vals = tuple(value)
        if len(vals) != nd:
            raise ValueError(f"{name} {value!r} must have one entry per grid dimension ({nd})")
    else:
        vals = (value,) * nd
    for v in vals:
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int or a tuple of positive ints, got {value!r}")
    return vals


def _check(grid, kernel_size, stride, dilation, causal):
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid must have 1, 2 or 3 dimensions, got {grid!r}")
    grid = _per_dim(grid, len(grid), "grid")
    nd = len(grid)
    k = _per_dim(kernel_size, nd, "kernel_size")
    s = _per_dim(stride, nd, "stride")
    d = _per_dim(dilation, nd, "dilation")
    c = _per_dim(causal, nd, "causal", bool)
    if any(ki * di > L for L, ki, di in zip(grid, k, d)):
        raise ValueError(f"kernel_size * dilation cannot be larger than the grid along any dimension (NATTEN's "
                         f"constraint); got grid={grid}, kernel_size={k}, dilation={d}")
    if any(si > ki for ki, si in zip(k, s)):
        raise ValueError(f"stride cannot be larger than kernel_size along any dimension (NATTEN's constraint); got "
                         f"kernel_size={k}, stride={s}")
    return grid, k, s, d, c


def gna_window_1d(length: int, kernel_size: int, stride: int = 1, dilation: int = 1, causal: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dimension of GNA as per-position windows: ``(group, pos, lo, hi)``, long ``[length]`` each. Position
    ``x`` is ``pos[x]`` in dilation group ``group[x]``; a query attends the keys of its group with ``lo <= pos <
    hi``. The window arithmetic lives here only: :func:`gna_mask_1d` and the exact kernels both use it."""
    (L,), (k,), (s,), (d,), (c,) = _check((length,), kernel_size, stride, dilation, causal)
    x = torch.arange(L)
    g, xd = x % d, x // d                         # dilation group and position inside it
    Lg = (L - g + d - 1) // d                     # length of each query's dilation group
    if c:
        lead = torch.minimum((xd // s) * s + s - 1, Lg - 1)
        lo, hi = lead - k + 1, xd + 1             # keys <= the query and within k of the leader
    else:
        lead = torch.minimum((xd // s) * s + s // 2, Lg - 1)
        lo = torch.minimum(torch.clamp(lead - k // 2, min=0), Lg - k)  # window shifted inward at the borders
        hi = lo + k
    return g, xd, lo, hi


def gna_mask_1d(length: int, kernel_size: int, stride: int = 1, dilation: int = 1, causal: bool = False
                ) -> torch.Tensor:
    """One dimension of GNA: bool ``[length, length]`` (query, key)."""
    g, y, lo, hi = gna_window_1d(length, kernel_size, stride, dilation, causal)
    return (g[:, None] == g[None, :]) & (y[None, :] >= lo[:, None]) & (y[None, :] < hi[:, None])


def gna_mask(grid: int | Sequence[int], kernel_size, stride=1, dilation=1, causal=False) -> torch.Tensor:
    """NATTEN's GNA as a bool token mask ``[N, N]`` (``N = prod(grid)``, tokens in raster order, True = attend)
    for a 1-, 2- or 3-D ``grid``. ``kernel_size``, ``stride``, ``dilation`` (ints) and ``causal`` (bools) are
    one value for every dimension or a tuple per dimension. Raises NATTEN's constraints
    (``kernel_size * dilation <= grid`` and ``stride <= kernel_size``) as ``ValueError``."""
    grid, k, s, d, c = _check(grid, kernel_size, stride, dilation, causal)
    masks = [gna_mask_1d(L, ki, si, di, ci) for L, ki, si, di, ci in zip(grid, k, s, d, c)]
    return _outer_and(masks)


def _outer_and(masks: list[torch.Tensor]) -> torch.Tensor:
    out = masks[0]
    for m in masks[1:]:
        a, b = out.shape[0], m.shape[0]
        out = (out[:, None, :, None] & m[None, :, None, :]).reshape(a * b, a * b)
    return out


def gna_tile_masks(grid, kernel_size, stride=1, dilation=1, causal=False, tile=None):
    """Per-dimension tile-level summaries: for each dimension ``(any, all)``, bool ``[L/t, L/t]`` saying whether
    some / every (query, key) pair of a (query tile, key tile) pair is in the window."""
    grid, k, s, d, c = _check(grid, kernel_size, stride, dilation, causal)
    tile = tuple(tile) if tile is not None else (1,) * len(grid)
    out = []
    for L, ki, si, di, ci, t in zip(grid, k, s, d, c, tile):
        m = gna_mask_1d(L, ki, si, di, ci).reshape(L // t, t, L // t, t)
        out.append((m.any(3).any(1), m.all(3).all(1)))
    return out


@dataclass(frozen=True)
class GNAPlan:
    """Everything the method needs for one grid: the tile permutation and the block mask in tile order."""

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    tile: tuple[int, ...]
    block_mask: torch.Tensor      # bool [nb, nb] in tile order (a block is kept if any of its pairs is)
    full_block_mask: torch.Tensor  # bool [nb, nb]: every pair of the block is in the window
    perm: torch.Tensor
    inverse: torch.Tensor
    aligned: bool                 # every kept block is entirely inside the mask: block-sparse is exact
    token_density: float
    block_density: float

    @property
    def block_size(self) -> int:
        return math.prod(self.tile)


def gna_plan(grid, kernel_size, stride=1, dilation=1, causal=False, tile=None) -> GNAPlan:
    """The tile-order block-sparse plan of a GNA configuration (``tile`` default: :func:`auto_tile`)."""
    grid, k, s, d, c = _check(grid, kernel_size, stride, dilation, causal)
    tile = tuple(tile) if tile is not None else auto_tile(grid)
    perm, inv = tile_permutation(grid, tile)
    summaries = gna_tile_masks(grid, k, s, d, c, tile)
    block = _outer_and([a for a, _ in summaries])
    full = _outer_and([b for _, b in summaries])
    aligned = bool(torch.equal(block, full))
    token_density = math.prod(float(gna_mask_1d(L, ki, si, di, ci).float().mean())
                              for L, ki, si, di, ci in zip(grid, k, s, d, c))
    return GNAPlan(grid, k, s, d, c, tile, block, full, perm, inv, aligned, token_density, float(block.float().mean()))


# ---- the method --------------------------------------------------------------------------------------------
@dataclass
class GNAConfig(Schedule):
    """GNA options. ``None`` means automatic (see ``GNA_DEFAULTS`` and ``docs/gna.md``). Sizes are ints or
    (frames, height, width) tuples; image families (Flux) may give (height, width)."""

    dense_first_steps: float | None = option(
        None, low=0, high=10000,
        help="run dense for the first N steps (< 1: a fraction of the steps); default: the family's (0.3)")
    kernel_size: Any = option(None, help="window per dimension (int or tuple); default: the family's fractions "
                                         "of the grid rounded to an odd multiple of the tile")
    stride: Any = option(None, help="stride per dimension (int or tuple); default: the tile (blocked GNA)")
    dilation: Any = option(1, help="dilation per dimension (int or tuple)")
    causal: Any = option(False, help="causal per dimension (bool or tuple of bools)")
    tile: Any = option(None, help="tile shape per dimension, each side dividing the grid; default: automatic, "
                                  "volume <= block_target")
    block_target: int = option(128, low=1, high=4096, help="largest tile volume (kernel block size) for auto tiles")
    exact: bool = option(True, help="exact token windows; when the mask is not tile-aligned the window is tested per "
                                    "token inside the kept tiles (memory linear in tokens x window; backend='dense' "
                                    "runs the N x N masked oracle). False: attend whole tiles (a superset), fastest")
    backend: str = option("auto", choices=BACKENDS + ("natten",),
                           help="block-sparse kernel backend, or 'natten' to call NATTEN's na2d/na3d (if installed)")

    def validate(self):
        if self.backend == "natten" and importlib.util.find_spec("natten") is None:
            raise ValueError("backend='natten' needs the natten package, which is not installed (pip install wheel && "
                             "pip install --no-build-isolation natten; on CPU it runs its Flex backend); use "
                             "backend='auto' for our kernels")
        for name in ("kernel_size", "stride", "dilation", "tile"):
            v = getattr(self, name)
            if v is None and name != "dilation":
                continue
            vals = v if isinstance(v, (list, tuple)) else (v,)
            if not vals or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in vals):
                raise ValueError(f"{name} must be a positive int or a tuple of positive ints, got {v!r}")
        cv = self.causal if isinstance(self.causal, (list, tuple)) else (self.causal,)
        if not all(isinstance(x, bool) for x in cv):
            raise ValueError(f"causal must be a bool or a tuple of bools, got {self.causal!r}")


def _as3(value, grid, name, fill=1):
    """An option value as a (frames, height, width) tuple; 2-tuples are (height, width) with frames ``fill``."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        v = tuple(value)
        if len(v) == 2:
            return (fill,) + v
        if len(v) == 3:
            return v
        raise ValueError(f"gna: {name} {value!r} must be one value or a tuple of 2 (height, width) or 3 "
                         f"(frames, height, width) values for the grid {grid}")
    return (value,) * 3


def _odd_multiple(length: int, frac: float, t: int) -> int:
    m = max(1, int(round(frac * length / t)))
    if m % 2 == 0:
        m = m + 1 if (m + 1) * t <= length else m - 1
    return min(max(m, 1) * t, length)


def resolve_geometry(cfg: GNAConfig, family: str, grid: tuple[int, int, int]):
    """(kernel, stride, dilation, causal, tile) for a (frames, height, width) grid."""
    tile = _as3(cfg.tile, grid, "tile")
    if tile is None:
        prefer = (2, 8, 8) if grid[0] > 1 else (1, 8, 16)
        tile = auto_tile(grid, cfg.block_target, prefer)
    kernel = _as3(cfg.kernel_size, grid, "kernel_size")
    if kernel is None:
        fr = GNA_DEFAULTS[family]["window"]
        kernel = tuple(_odd_multiple(L, f, t) for L, f, t in zip(grid, fr, tile))
    stride = _as3(cfg.stride, grid, "stride")
    if stride is None:
        stride = tuple(min(t, k) for t, k in zip(tile, kernel))
    dilation = _as3(cfg.dilation, grid, "dilation")
    causal = _as3(cfg.causal, grid, "causal", fill=False)
    # single-frame grids (images): any frame setting collapses to 1
    if grid[0] == 1:
        kernel, stride, dilation, tile = ((1,) + tuple(x[1:]) for x in (kernel, stride, dilation, tile))
    return kernel, stride, dilation, causal, tile


@register
class GNA(SparseMethod):
    """Generalized Neighborhood Attention over the visual token grid, text tokens as extra keys."""

    name = "gna"
    summary = "Generalized Neighborhood Attention (NATTEN GNA): windowed/strided grid attention, tile block-sparse."
    Config = GNAConfig
    families = SUPPORTED_FAMILIES
    defaults = GNA_DEFAULTS
    sparse_kinds = ("self", "joint")
    context_parallel = frozenset({"ulysses", "ring"})  # windows from the layout (docs/context_parallel.md)

    def __init__(self, config=None):
        super().__init__(config)
        self._plans = LRU(32)          # (family, grid) -> GNAPlan
        self._on_device = LRU(8)       # (family, grid, device) -> (block mask, perm, inverse)
        self._token_masks = LRU(1)     # N x N each: keep one
        self._windows = LRU(8)         # (family, grid, device) -> exact window test (gna_exact.gna_token_window)

    def plan_for(self, site) -> GNAPlan:
        """The plan (tile permutation, tile-order block mask, densities) at ``site``; cached per grid."""
        return self._plan(self.config_for(site), site.require_layout(self.name), site)

    def _plan(self, cfg, layout, site) -> GNAPlan:
        def make():
            try:
                return gna_plan(layout.grid, *resolve_geometry(cfg, site.family, layout.grid))
            except ValueError as e:
                raise ValueError(f"gna at {site.name or 'this call'} (visual grid frames x height x width = "
                                 f"{layout.grid}): {e}") from None
        return self._plans.get_or((site.family, layout.grid), make)

    def block_mask_for(self, site) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(block_mask [nb, nb] in tile order, block_size, perm)`` at ``site`` (tokens ``x[perm]``)."""
        plan = self.plan_for(site)
        return plan.block_mask, plan.block_size, plan.perm

    def visual_token_mask(self, config, layout, site):
        plan = self._plan(config, layout, site)
        exact = config.exact or plan.aligned

        def make():
            if exact:
                return gna_mask(plan.grid, plan.kernel_size, plan.stride, plan.dilation, plan.causal)
            B = plan.block_size
            tiled = plan.block_mask.repeat_interleave(B, 0).repeat_interleave(B, 1)
            return tiled[plan.inverse][:, plan.inverse]
        return self._token_masks.get_or((plan.grid, exact), make)

    def visual_block_pattern(self, config, layout, site):
        """The tile-order block mask where it is what runs (aligned windows, or ``exact=False``); else the exact
        token mask."""
        plan = self._plan(config, layout, site)
        if config.exact and not plan.aligned:
            return super().visual_block_pattern(config, layout, site)
        return plan.block_mask, plan.inverse // plan.block_size

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        plan = self._plan(config, layout, site)
        if config.backend == "natten":
            return _natten_attention(plan, q, k, v, extra_k, extra_v, scale)
        if config.exact and not plan.aligned and config.backend != "dense":
            from .gna_exact import exact_gna_attention, gna_token_window  # it builds on this module

            window = self._windows.get_or((site.family, plan.grid, str(q.device)),
                                          lambda: gna_token_window(plan, q.device))
            return exact_gna_attention(plan, window, q, k, v, extra_k=extra_k, extra_v=extra_v, scale=scale,
                                       backend=config.backend if config.backend in ("flex", "gather") else "auto")
        if config.exact and not plan.aligned:  # the oracle: dense attention with the N x N token mask
            tm = self.visual_token_mask(config, layout, site).to(q.device)
            if extra_k is not None:
                k, v = torch.cat([k, extra_k], 2), torch.cat([v, extra_v], 2)
                tm = torch.cat([tm, tm.new_ones(tm.shape[0], extra_k.shape[2])], 1)
            return dense_attention(q, k, v, attn_mask=tm, scale=scale)
        bm, perm, inv = self._on_device.get_or((site.family, plan.grid, str(q.device)), lambda: (
            plan.block_mask.to(q.device)[None, None], plan.perm.to(q.device), plan.inverse.to(q.device)))
        out = block_sparse_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], bm, plan.block_size, scale=scale,
                                     extra_k=extra_k, extra_v=extra_v, backend=config.backend)
        return out[:, :, inv]


def _natten_attention(plan: GNAPlan, q, k, v, extra_k, extra_v, scale):
    """Visual attention through NATTEN's ``na3d`` (``na2d`` for single-frame grids): its tensors are heads-last,
    ``[B, *grid, heads, D]``. Text keys are a second attention merged by log-sum-exp here, not NATTEN's
    ``additional_keys`` (0.21.7 on CPU rejects its own non-contiguous Flex output when merging them)."""
    import natten

    dims = slice(0, 3) if plan.grid[0] > 1 else slice(1, 3)
    shape = plan.grid[dims]
    na = natten.na3d if plan.grid[0] > 1 else natten.na2d
    b, h, n, _ = q.shape
    scale = scale if scale is not None else q.shape[-1] ** -0.5

    def grid_major(t):
        return t.transpose(1, 2).reshape(b, *shape, h, t.shape[-1])

    out, lse = na(grid_major(q), grid_major(k), grid_major(v), kernel_size=plan.kernel_size[dims],
                  stride=plan.stride[dims], dilation=plan.dilation[dims], is_causal=plan.causal[dims], scale=scale,
                  return_lse=True)
    out = out.reshape(b, n, h, -1).transpose(1, 2)
    if extra_k is None:
        return out
    lse = lse.reshape(b, n, h).transpose(1, 2).float()
    one_block = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    text, text_lse = dense_block_sparse(q, extra_k, extra_v, one_block, n, extra_k.shape[2], scale, return_lse=True)
    return merge_attention(out, lse, text, text_lse)[0]
