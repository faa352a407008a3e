"""Generalised Hilbert ("Gilbert") curve over any 3-D grid, as a token layout permutation.

The curve visits every cell of a ``T x H x W`` grid once, stepping to a face neighbour each time (for grids with
even sides; odd sides may need one diagonal step), so every run of consecutive curve positions is a compact 3-D
patch. Rectified SpaAttn (after Jenga) orders the visual tokens along it with width as the major axis, then
height, then time, and uses :func:`gilbert_block_neighbors` to always keep blocks that touch each other.

The curve is the standard recursive construction (split the longest side in two, keep the sub-boxes' start and
end on the shared faces, prefer even splits); it is the curve the reference's ``gilbert_xyz2d`` indexes.
"""
from __future__ import annotations

import functools
import math

import torch

from attnproc.kernels import num_blocks

__all__ = ["gilbert_order", "gilbert_permutation", "gilbert_block_neighbors", "block_neighbors"]

_AXES = {"w": 0, "h": 1, "t": 2}


def _sgn(x: int) -> int:
    return (x > 0) - (x < 0)


def _walk(out: list, x, y, z, a, b, c) -> None:
    """Append the cells of the box at ``(x, y, z)`` spanned by the vectors ``a`` (major), ``b``, ``c``."""
    w, h, d = abs(sum(a)), abs(sum(b)), abs(sum(c))
    da, db, dc = tuple(map(_sgn, a)), tuple(map(_sgn, b)), tuple(map(_sgn, c))
    if h == 1 and d == 1:
        out.extend((x + i * da[0], y + i * da[1], z + i * da[2]) for i in range(w))
        return
    if w == 1 and d == 1:
        out.extend((x + i * db[0], y + i * db[1], z + i * db[2]) for i in range(h))
        return
    if w == 1 and h == 1:
        out.extend((x + i * dc[0], y + i * dc[1], z + i * dc[2]) for i in range(d))
        return
    a2, b2, c2 = tuple(v // 2 for v in a), tuple(v // 2 for v in b), tuple(v // 2 for v in c)
    if abs(sum(a2)) % 2 and w > 2:
        a2 = tuple(u + s for u, s in zip(a2, da))
    if abs(sum(b2)) % 2 and h > 2:
        b2 = tuple(u + s for u, s in zip(b2, db))
    if abs(sum(c2)) % 2 and d > 2:
        c2 = tuple(u + s for u, s in zip(c2, dc))
    neg = lambda v: tuple(-u for u in v)  # noqa: E731
    sub = lambda u, v: tuple(p - q for p, q in zip(u, v))  # noqa: E731
    p = (x, y, z)
    at = lambda *vs: tuple(sum(t) for t in zip(p, *vs))  # noqa: E731
    if 2 * w > 3 * h and 2 * w > 3 * d:  # long box: split the major side only
        _walk(out, *p, a2, b, c)
        _walk(out, *at(a2), sub(a, a2), b, c)
    elif 3 * h > 4 * d:  # split major and second side
        _walk(out, *p, b2, c, a2)
        _walk(out, *at(b2), a, sub(b, b2), c)
        _walk(out, *at(sub(a, da), sub(b2, db)), neg(b2), c, neg(sub(a, a2)))
    elif 3 * d > 4 * h:  # split major and third side
        _walk(out, *p, c2, a2, b)
        _walk(out, *at(c2), a, b, sub(c, c2))
        _walk(out, *at(sub(a, da), sub(c2, dc)), neg(c2), neg(sub(a, a2)), b)
    else:  # split all three sides
        _walk(out, *p, b2, c2, a2)
        _walk(out, *at(b2), c, a2, sub(b, b2))
        _walk(out, *at(sub(b2, db), sub(c, dc)), a, neg(b2), neg(sub(c, c2)))
        _walk(out, *at(sub(a, da), b2, sub(c, dc)), neg(c), neg(sub(a, a2)), sub(b, b2))
        _walk(out, *at(sub(a, da), sub(b2, db)), neg(b2), c2, neg(sub(a, a2)))


def check_grid(grid) -> tuple[int, int, int]:
    """``(T, H, W)`` as ints, or a clear error."""
    try:
        T, H, W = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (T, H, W); got {grid!r}") from None
    if min(T, H, W) < 1:
        raise ValueError(f"grid sides must be >= 1; got {grid!r}")
    return T, H, W


def _check(grid, axis_order):
    T, H, W = check_grid(grid)
    if sorted(axis_order) != ["h", "t", "w"]:
        raise ValueError(f"axis_order must order 'w', 'h', 't'; got {axis_order!r}")
    return (T, H, W), tuple(axis_order)


@functools.lru_cache(maxsize=32)
def _order(grid: tuple[int, int, int], axis_order: tuple[str, ...]) -> torch.Tensor:
    T, H, W = grid
    size = {"w": W, "h": H, "t": T}
    vecs = []
    for name in axis_order:
        v = [0, 0, 0]
        v[_AXES[name]] = size[name]
        vecs.append(tuple(v))
    cells: list = []
    _walk(cells, 0, 0, 0, *vecs)
    xyz = torch.tensor(cells, dtype=torch.long)  # (x = w, y = h, z = t)
    return xyz[:, 2] * (H * W) + xyz[:, 1] * W + xyz[:, 0]


def gilbert_order(grid, axis_order=("w", "h", "t")) -> torch.Tensor:
    """Raster index (frame-major ``t*H*W + h*W + w``) of each position along the curve, ``[T*H*W]`` long."""
    return _order(*_check(grid, axis_order)).clone()


def gilbert_permutation(grid, axis_order=("w", "h", "t")) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)``: ``x_curve = x[..., perm, :]`` puts raster-order tokens in curve order and
    ``x = x_curve[..., inverse, :]`` undoes it (``inverse[i]`` is raster token ``i``'s curve position)."""
    perm = gilbert_order(grid, axis_order)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


def block_neighbors(grid, position: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """bool ``[nb, nb]`` for tokens laid out at ``position[i]`` (raster token ``i``; ``None``: raster order) and
    cut into blocks of ``block_size``: block ``a`` touches block ``b`` when some token of ``a`` has a token of
    ``b`` among its 26 grid neighbours (or itself)."""
    T, H, W = grid
    pos = torch.arange(T * H * W) if position is None else position
    blk = (pos // block_size).reshape(T, H, W)
    nb = num_blocks(T * H * W, block_size)
    table = torch.zeros(nb * nb, dtype=torch.bool)
    for dt in (-1, 0, 1):
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                a = blk[max(0, -dt):T - max(0, dt), max(0, -dh):H - max(0, dh), max(0, -dw):W - max(0, dw)]
                b = blk[max(0, dt):T + min(0, dt), max(0, dh):H + min(0, dh), max(0, dw):W + min(0, dw)]
                table[(a * nb + b).reshape(-1)] = True
    return table.reshape(nb, nb)


@functools.lru_cache(maxsize=32)
def _neighbors(grid, axis_order, block_size):
    return block_neighbors(grid, gilbert_permutation(grid, axis_order)[1], block_size)


def gilbert_block_neighbors(grid, block_size: int = 128, axis_order=("w", "h", "t")) -> torch.Tensor:
    """bool ``[nb, nb]`` (``nb = ceil(N / block_size)``): block ``i`` of the curve order touches block ``j`` (some
    token of ``i`` has a token of ``j`` among its 26 grid neighbours, or ``i == j``)."""
    grid, axis_order = _check(grid, axis_order)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    return _neighbors(grid, axis_order, int(block_size)).clone()
