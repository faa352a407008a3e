"""Triton block-sparse attention (forward): FlashAttention-style online softmax over a block index table.

One program per (query block, batch*head). It walks the query block's kept key blocks from the index table
(``indices[b, h, i, :counts[b, h, i]]``), then the extra keys in tiles of ``bk``, keeping a running max and
sum in base 2, and writes the output and the natural-log LSE. Lengths need not be multiples of the block
sizes (loads are masked; keys past the sequence get ``-inf``). Block sizes must be powers of two >= 16
(``tl.dot`` tile constraints). fp32 inputs use IEEE-precision dots (no TF32), so the result matches the
oracle to fp32 round-off at the cost of speed.

Forward only: there is no backward kernel; the dispatcher routes calls that need a gradient to flex.
This module imports triton at import time and is itself imported lazily, so ``TRITON_INTERPRET=1`` set
before the first triton call takes effect (the interpreter runs it on CPU tensors, for tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blockmask import block_mask_to_index, num_blocks

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _update(q, k_ptrs, v_ptrs, key_ok, m_i, l_i, acc, qk_scale, d_ok, dv_ok, IEEE: tl.constexpr):
    k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptrs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, EK, EV, IDX, CNT, OUT, LSE,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sek_b, sek_h, sek_s, sek_d,
    sev_b, sev_h, sev_s, sev_d,
    si_b, si_h, si_q, si_w,
    sc_b, sc_h, sc_q,
    so_b, so_h, so_s, so_d,
    sl_b, sl_h, sl_s,
    H, SQ, SK, SE, D, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr,
):
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q_ok = offs_m < SQ
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    cnt = tl.load(CNT + b * sc_b + h * sc_h + qblk * sc_q)
    idx_row = IDX + b * si_b + h * si_h + qblk * si_q
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for t in range(0, cnt):
        kb = tl.load(idx_row + t * si_w)
        keys = kb * BLOCK_N + offs_n
        key_ok = keys < SK
        m_i, l_i, acc = _update(
            q, k_base + keys[:, None] * sk_s + offs_d[None, :] * sk_d,
            v_base + keys[:, None] * sv_s + offs_dv[None, :] * sv_d,
            key_ok, m_i, l_i, acc, qk_scale, d_ok, dv_ok, IEEE,
        )
    if HAS_EXTRA:
        ek_base = EK + b * sek_b + h * sek_h
        ev_base = EV + b * sev_b + h * sev_h
        for start in range(0, SE, BLOCK_N):
            keys = start + offs_n
            key_ok = keys < SE
            m_i, l_i, acc = _update(
                q, ek_base + keys[:, None] * sek_s + offs_d[None, :] * sek_d,
                ev_base + keys[:, None] * sev_s + offs_dv[None, :] * sev_d,
                key_ok, m_i, l_i, acc, qk_scale, d_ok, dv_ok, IEEE,
            )
    out = acc / l_i[:, None]
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_dv[None, :] * so_d,
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * sl_b + h * sl_h + offs_m * sl_s, lse, mask=q_ok)


def _pow2(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


def triton_block_sparse(q, k, v, block_mask, bq, bk, scale, extra_k=None, extra_v=None, return_lse=False):
    if not (_pow2(bq) and _pow2(bk)):
        raise ValueError(f"backend='triton' needs power-of-two block sizes >= 16; got ({bq}, {bk})")
    B, H, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    nq = num_blocks(Sq, bq)
    indices, counts = block_mask_to_index(block_mask)
    # broadcast batch/head dims of the table through zero strides
    indices = indices.expand(B, H, *indices.shape[2:])
    counts = counts.expand(B, H, nq)
    out = torch.empty(B, H, Sq, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    has_extra = extra_k is not None
    ek, ev = (extra_k, extra_v) if has_extra else (k, v)
    Se = extra_k.shape[2] if has_extra else 0
    grid = (nq, B * H)
    _block_sparse_fwd[grid](
        q, k, v, ek, ev, indices, counts, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ek.stride(), *ev.stride(),
        *indices.stride(), *counts.stride(), *out.stride(), *lse.stride(),
        H, Sq, Sk, Se, D, Dv, scale * _LOG2E,
        BLOCK_M=bq, BLOCK_N=bk, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        HAS_EXTRA=has_extra, IEEE=q.dtype == torch.float32,
        # untuned starting point (no GPU in the session that wrote this): FA2-like warps for large tiles
        num_warps=8 if bq * bk >= 128 * 128 or D > 64 else 4, num_stages=2,
    )
    return out, (lse if return_lse else None)
