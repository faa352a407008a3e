"""Block-sparse attention with a token mask inside the kept blocks: exact attention for masks that are not unions
of whole blocks, in memory proportional to the kept blocks (never ``Sq x Sk``).

The mask is given twice: ``kept`` / ``full`` block masks (which ``(query block, key block)`` pairs hold some /
only allowed pairs) and ``token_mask(q_idx, kv_idx)``, a broadcasting predicate on integer index tensors that is
the truth inside the blocks. Full blocks skip the predicate; partial blocks (kept, not full) evaluate it. Extra
keys (``extra_k``/``extra_v``, e.g. text) are attended by every query in the same softmax.

Two paths, chosen like :func:`block_sparse_attention` chooses its backend: ``flex`` (compiled flex attention,
a ``BlockMask`` whose partial blocks carry ``token_mask`` as its ``mask_mod``) and ``gather`` (pure torch: per
chunk of query blocks, gather the kept key blocks and apply ``token_mask`` to the gathered scores).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from . import _flex
from .blockmask import block_mask_to_index
from .sparse import BackendFallbackWarning, select_backend

__all__ = ["masked_block_attention", "MASKED_BACKENDS"]

MASKED_BACKENDS = ("auto", "flex", "gather")

# bytes of float32 scores per gather chunk (B x H x rows x bq x gathered keys)
_CHUNK_SCORE_BYTES = 32 << 20


def masked_block_attention(q, k, v, kept: torch.Tensor, full: torch.Tensor, token_mask: Callable, block_size: int,
                           *, scale: float | None = None, extra_k=None, extra_v=None, backend: str = "auto"):
    """Attention where query ``i`` attends key ``j`` iff ``token_mask(i, j)`` (plus every extra key).

    ``q``, ``k``, ``v``: ``[B, H, S, D]`` with ``S`` a multiple of ``block_size``; ``kept``/``full``: bool
    ``[nq, nk]``; every allowed pair must lie in a kept block and every pair of a full block must be allowed
    (the caller's promise: full blocks are not checked). ``backend``: ``"auto"``, ``"flex"`` or ``"gather"``
    (``flex`` resolves to ``gather`` where flex cannot serve the call, as in :func:`select_backend`)."""
    if backend not in MASKED_BACKENDS:
        raise ValueError(f"backend must be one of {MASKED_BACKENDS}; got {backend!r}")
    B, H, Sq, D = q.shape
    Sk, bs = k.shape[2], int(block_size)
    if Sq % bs or Sk % bs:
        raise ValueError(f"masked_block_attention needs lengths that are multiples of block_size={bs}; got q "
                         f"length {Sq}, k length {Sk}")
    nq, nk = Sq // bs, Sk // bs
    if tuple(kept.shape) != (nq, nk) or tuple(full.shape) != (nq, nk):
        raise ValueError(f"kept and full must be bool [{nq}, {nk}] block masks; got {tuple(kept.shape)}, "
                         f"{tuple(full.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    se = extra_k.shape[2] if extra_k is not None else 0
    tensors = (q, k, v) + ((extra_k, extra_v) if se else ())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    name, reason = select_backend(backend, q.device.type, needs_grad=needs_grad, block_size=bs,
                                  pairs=B * H * Sq * (Sk + se))
    if name == "triton":  # the Triton kernel takes no token mask; flex does the same job on CUDA
        name = "flex" if _flex.supports(q.device.type, needs_grad=needs_grad, return_lse=False, bq=bs,
                                        bk=bs) is None else "gather"
    if backend not in ("auto", name):
        warnings.warn(f"backend={backend!r} -> {name!r}: {reason}", BackendFallbackWarning, stacklevel=2)
    if name == "flex":
        return _flex.flex_attention_token_masked(q, k, v, kept, full, token_mask, bs, scale, extra_k, extra_v)
    return _gather_masked(q, k, v, kept, token_mask, bs, scale, extra_k, extra_v)


def _gather_masked(q, k, v, kept, token_mask, bs, scale, extra_k, extra_v):
    """Per chunk of query blocks: gather their kept key blocks (padded to the longest row), mask the scores with
    ``token_mask`` and with the padding, one SDPA call."""
    B, H, Sq, D = q.shape
    Dv = v.shape[-1]
    nq, nk = kept.shape
    dev = q.device
    idx, _ = block_mask_to_index(kept.cpu())              # [nq, c], -1 = padding
    c = idx.shape[1]
    real = (idx >= 0).repeat_interleave(bs, 1)            # [nq, c * bs]
    idx = idx.clamp(min=0).long()
    se = extra_k.shape[2] if extra_k is not None else 0
    qb = q.reshape(B, H, nq, bs, D)
    kb, vb = k.reshape(B, H, nk, bs, D), v.reshape(B, H, nk, bs, Dv)
    outs = []
    rows_per_chunk = max(1, _CHUNK_SCORE_BYTES // (4 * B * H * bs * (c * bs + se)))
    offs = torch.arange(bs)
    for r0 in range(0, nq, rows_per_chunk):
        rows = torch.arange(r0, min(nq, r0 + rows_per_chunk))
        R = rows.numel()
        qi = (rows[:, None] * bs + offs)[:, :, None]                                   # [R, bs, 1]
        ki = (idx[rows][:, :, None] * bs + offs).reshape(R, 1, c * bs)                 # [R, 1, c*bs]
        m = token_mask(qi.to(dev), ki.to(dev)) & real[rows][:, None, :].to(dev)       # [R, bs, c*bs]
        flat = idx[rows].reshape(-1).to(dev)
        kr = kb.index_select(2, flat).reshape(B, H, R, c * bs, D)
        vr = vb.index_select(2, flat).reshape(B, H, R, c * bs, Dv)
        if se:
            kr = torch.cat([kr, extra_k[:, :, None].expand(B, H, R, se, D)], 3)
            vr = torch.cat([vr, extra_v[:, :, None].expand(B, H, R, se, Dv)], 3)
            m = torch.cat([m, m.new_ones(R, bs, se)], -1)

        def batch_rows(t):  # [B, H, R, L, E] -> [B * R, H, L, E]
            return t.transpose(1, 2).reshape(B * R, H, t.shape[3], t.shape[4])

        o = F.scaled_dot_product_attention(batch_rows(qb[:, :, r0:r0 + R]), batch_rows(kr), batch_rows(vr),
                                           attn_mask=m[None, :, None].expand(B, R, 1, *m.shape[1:]).reshape(
                                               B * R, 1, *m.shape[1:]), scale=scale)
        outs.append(o.reshape(B, R, H, bs, Dv).transpose(1, 2))
    return torch.cat(outs, 2).reshape(B, H, Sq, Dv)
