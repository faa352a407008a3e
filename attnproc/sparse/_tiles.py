"""Tile order: permute raster-order grid tokens so that each tile (a small box of the grid) is contiguous.

With tokens in tile order and one tile per kernel block, a mask that is a union of tile x tile boxes (GNA with
stride = tile and a window that is an odd multiple of the tile) is exactly block-sparse: no computed score is
thrown away.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

__all__ = ["tile_permutation", "auto_tile", "divisors"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.lru_cache(maxsize=256)
def auto_tile(grid: tuple[int, ...], target: int = 128, prefer: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """A tile shape dividing ``grid`` with the largest volume ``<= target``; ties go to the shape closest (in log
    ratio) to ``prefer`` (default: equal sides), so a 8x32x32 grid gets 2x8x8 for ``target=128``."""
    grid = tuple(int(g) for g in grid)
    if prefer is None:
        side = target ** (1.0 / len(grid))
        prefer = tuple(side for _ in grid)
    best, best_key = None, None
    for shape in itertools.product(*(divisors(g) for g in grid)):
        vol = math.prod(shape)
        if vol > target:
            continue
        off = sum(abs(math.log(s / max(p, 1e-9))) for s, p in zip(shape, prefer))
        key = (vol, -off)
        if best_key is None or key > best_key:
            best, best_key = shape, key
    return best


@functools.lru_cache(maxsize=64)
def _perm(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(grid)
    idx = torch.arange(n).reshape(grid)
    nt = [g // t for g, t in zip(grid, tile)]
    # [n1, t1, n2, t2, ...] -> [n1, n2, ..., t1, t2, ...]
    split = idx.reshape([x for pair in zip(nt, tile) for x in pair])
    d = len(grid)
    order = [2 * i for i in range(d)] + [2 * i + 1 for i in range(d)]
    return split.permute(order).reshape(n).contiguous()


def tile_permutation(grid, tile) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)``: ``x_tiled = x[..., perm, :]`` puts raster-order tokens in tile order (tiles in raster
    order, tokens in raster order inside each tile); ``x = x_tiled[..., inverse, :]`` undoes it. Every tile side
    must divide the grid side."""
    grid, tile = tuple(int(g) for g in grid), tuple(int(t) for t in tile)
    if len(grid) != len(tile):
        raise ValueError(f"tile {tile} must have one side per grid dimension {grid}")
    bad = [(g, t) for g, t in zip(grid, tile) if t < 1 or g % t]
    if bad:
        raise ValueError(f"tile {tile} does not divide the grid {grid}: every tile side must divide its grid side")
    perm = _perm(grid, tile)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv
