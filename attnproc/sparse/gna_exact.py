"""Exact GNA windows without an ``N x N`` mask: the window test per (query, key) token pair inside the kept tile
blocks, from per-token bounds (``O(dims x N)`` memory).

In tile order every token has, per grid dimension, a key coordinate ``u`` (its dilation group times the axis
length plus its position in the group) and a query range ``[lo, hi)`` of such coordinates. A pair is in the
window iff ``lo[q] <= u[k] < hi[q]`` in every dimension (the range never leaves the query's group). Blocks that
are entirely inside (the plan's ``full_block_mask``) skip the test; the rest of the kept blocks evaluate it.
"""
from __future__ import annotations

from typing import Callable

import torch

from attnproc.kernels.masked import masked_block_attention

from .gna import GNAPlan, gna_window_1d

__all__ = ["gna_token_window", "exact_gna_attention"]


def gna_token_window(plan: GNAPlan, device=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``window(q_idx, kv_idx) -> bool`` (broadcasting integer tensors of tile-order token indices): GNA's mask
    in tile order, i.e. ``gna_mask(...)[perm][:, perm]`` evaluated pair by pair."""
    raster = plan.perm
    keys, los, his = [], [], []
    stride = 1
    for axis in reversed(range(len(plan.grid))):
        L = plan.grid[axis]
        coord = (raster // stride) % L
        stride *= L
        g, y, lo, hi = gna_window_1d(L, plan.kernel_size[axis], plan.stride[axis], plan.dilation[axis],
                                     plan.causal[axis])
        if bool(((lo <= 0) & (hi >= L)).all()) and plan.dilation[axis] == 1:
            continue                                   # the whole axis: no test needed
        keys.append((g * L + y)[coord])
        los.append((g * L + lo)[coord])
        his.append((g * L + hi)[coord])
    if not keys:
        def everything(q_idx, kv_idx):
            return (q_idx >= 0) & (kv_idx >= 0)
        return everything
    u, lo, hi = (torch.stack(t).to(device) for t in (keys, los, his))

    def window(q_idx, kv_idx):
        inside = None
        for axis in range(u.shape[0]):
            key = u[axis][kv_idx]
            this = (key >= lo[axis][q_idx]) & (key < hi[axis][q_idx])
            inside = this if inside is None else inside & this
        return inside
    return window


def exact_gna_attention(plan: GNAPlan, window, q, k, v, *, extra_k=None, extra_v=None, scale=None,
                        backend: str = "auto"):
    """Exact GNA over visual tokens in raster order (text as ``extra_k``/``extra_v``): tokens permuted to tile
    order, one kernel block per tile, :func:`masked_block_attention` with ``window`` from
    :func:`gna_token_window` (on q's device). ``backend``: ``auto``, ``flex`` or ``gather``."""
    perm, inv = plan.perm.to(q.device), plan.inverse.to(q.device)
    out = masked_block_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], plan.block_mask.to(q.device),
                                 plan.full_block_mask.to(q.device), window, plan.block_size, scale=scale,
                                 extra_k=extra_k, extra_v=extra_v, backend=backend)
    return out[:, :, inv]
