"""Pure-torch block-sparse attention: per query block, gather its key blocks, one attention call.

Rows (b, mask-head, query block) are grouped by their number of key blocks; rows of one group that share
(b, mask-head) are processed in chunks sized to stay cache-friendly, with one gather and one SDPA call per
chunk. For inference on CPU (D == Dv), rows too long for one cache-sized chunk are split into pieces whose
partial attentions (with LSE from ATen's CPU flash kernel) are merged exactly. Works on any device, in
fp32/fp16/bf16, and is fully differentiable (the split path only runs when no gradient is needed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blockmask import num_blocks, pad_to_blocks
from .merge import merge_attention

# bytes of gathered K+V per chunk (one chunk = rows sharing a key-block count, one gather + one SDPA call);
# ~1 MB measured best on the dev CPU (L2-sized: the gathered keys are still in cache when SDPA reads them)
CHUNK_BYTES = 1 << 20


def _math_attention(q, k, v, key_valid, scale):
    """Attention with LSE in float32; differentiable through both outputs."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.float()).to(q.dtype), lse


def _cpu_flash_with_lse():
    """ATen's CPU flash-attention op returns (out, lse) but has no gradient for the lse; inference only."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def _fast_lse_attention(op, q, k, v, key_valid, scale):
    mask = None
    if key_valid is not None:
        mask = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device).masked_fill(~key_valid, float("-inf"))
    res = op(q, k, v, attn_mask=mask, scale=scale)
    return res[0], res[1].float()


def _split_row(op, qr, kbh, vbh, kv_idx, split_blocks, nk, bk, tail, ek, ev, scale):
    """One row whose gathered K/V would not fit in cache: pieces of ``split_blocks`` key blocks (then the extra
    keys), each with its LSE from ATen's CPU flash kernel, merged exactly in float32. ``None`` if the op refuses."""
    Hr, D, Dv = qr.shape[1], kbh.shape[-1], vbh.shape[-1]
    out = lse = None
    try:
        pieces = []
        for p0 in range(0, kv_idx.numel(), split_blocks):
            part = kv_idx[p0 : p0 + split_blocks]
            m = part.numel()
            flat = part.to(qr.device)
            kr = kbh.index_select(1, flat).reshape(1, Hr, m * bk, D)
            vr = vbh.index_select(1, flat).reshape(1, Hr, m * bk, Dv)
            kvalid = None
            if tail != bk and bool((part == nk - 1).any()):
                kvalid = torch.ones(m, bk, dtype=torch.bool)
                kvalid[part == nk - 1] = torch.arange(bk) < tail
                kvalid = kvalid.reshape(1, 1, 1, m * bk).to(qr.device)
            pieces.append(_fast_lse_attention(op, qr, kr, vr, kvalid, scale))
        if ek is not None:
            pieces.append(_fast_lse_attention(op, qr, ek.unsqueeze(0), ev.unsqueeze(0), None, scale))
    except RuntimeError:
        return None
    for o, l in pieces:
        if out is None:
            out, lse = o.float(), l
        else:
            out, lse = merge_attention(out, lse, o, l)
    return out.to(qr.dtype), lse


def gather_attention(q, k, v, block_mask, bq, bk, scale, extra_k=None, extra_v=None, return_lse=False,
                     *, needs_grad=True):
    B, H, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    nq, nk = num_blocks(Sq, bq), num_blocks(Sk, bk)
    Bm, Hm = block_mask.shape[:2]
    Hr = H // Hm
    qp, _ = pad_to_blocks(q, bq)
    kp, _ = pad_to_blocks(k, bk)
    vp, _ = pad_to_blocks(v, bk)
    qb = qp.reshape(B, Hm, Hr, nq, bq, D)
    kb = kp.reshape(B, Hm, Hr, nk, bk, D)
    vb = vp.reshape(B, Hm, Hr, nk, bk, Dv)
    if extra_k is not None:
        Se = extra_k.shape[2]
        ek = extra_k.reshape(B, Hm, Hr, Se, D)
        ev = extra_v.reshape(B, Hm, Hr, Se, Dv)
    tail = Sk - (nk - 1) * bk  # valid keys in the last key block
    bm = block_mask.expand(B, Hm, nq, nk)
    counts = bm.sum(-1)  # [B, Hm, nq]
    order = torch.sort(bm.to(torch.int8), dim=-1, descending=True, stable=True).indices  # kept blocks first
    counts_cpu = counts.cpu()
    order_cpu = order.cpu()
    elt = q.element_size()
    # inference on CPU with D == Dv: ATen's flash kernel gives the LSE (no gradient for it) -- used for
    # return_lse, and to split rows whose gathered K/V would not fit in cache into LSE-merged pieces
    flash_lse = _cpu_flash_with_lse() if (not needs_grad and q.device.type == "cpu" and D == Dv) else None
    fast_lse = flash_lse if return_lse else None
    split_blocks = max(1, CHUNK_BYTES // max(1, Hr * bk * (D + Dv) * elt))  # key blocks per piece

    outs, lses, rows_done = [], [], []
    for b in range(B):
        for hm in range(Hm):
            qbh, kbh, vbh = qb[b, hm], kb[b, hm], vb[b, hm]  # [Hr, n, blk, D]
            c_row = counts_cpu[b, hm]
            for c in torch.unique(c_row).tolist():
                rows = torch.nonzero(c_row == c).flatten()
                per_row = max(1, Hr * max(c * bk, 1) * (D + Dv) * elt)
                R = max(1, CHUNK_BYTES // per_row)
                split = flash_lse is not None and c > 2 * split_blocks
                for s in range(0, rows.numel(), 1 if split else R):
                    r = rows[s : s + (1 if split else R)]
                    n = r.numel()
                    rd = r.to(q.device)
                    qr = qbh.index_select(1, rd).transpose(0, 1)  # [n, Hr, bq, D]
                    key_valid = None
                    if split:
                        res = _split_row(flash_lse, qr, kbh, vbh, order_cpu[b, hm, r[0], :c], split_blocks, nk, bk,
                                         tail, ek[b, hm] if extra_k is not None else None,
                                         ev[b, hm] if extra_k is not None else None, scale)
                        if res is not None:
                            outs.append(res[0])
                            if return_lse:
                                lses.append(res[1])
                            rows_done.append(r + (b * Hm + hm) * nq)
                            continue
                        flash_lse = fast_lse = None  # the op refused: plain path from now on
                        split = False
                    if c > 0:
                        kv_idx = order_cpu[b, hm, r, :c]  # [n, c]
                        flat = kv_idx.reshape(-1).to(q.device)
                        kr = kbh.index_select(1, flat).reshape(Hr, n, c * bk, D).transpose(0, 1)
                        vr = vbh.index_select(1, flat).reshape(Hr, n, c * bk, Dv).transpose(0, 1)
                        if tail != bk and bool((kv_idx == nk - 1).any()):
                            kvalid = torch.ones(n, c, bk, dtype=torch.bool)
                            kvalid[kv_idx == nk - 1] = torch.arange(bk) < tail
                            key_valid = kvalid.reshape(n, 1, 1, c * bk).to(q.device)
                    if extra_k is not None:
                        er = ek[b, hm].unsqueeze(0).expand(n, Hr, Se, D)
                        evr = ev[b, hm].unsqueeze(0).expand(n, Hr, Se, Dv)
                        if c > 0:
                            kr = torch.cat([kr, er], dim=2)
                            vr = torch.cat([vr, evr], dim=2)
                            if key_valid is not None:
                                key_valid = torch.cat(
                                    [key_valid, torch.ones(n, 1, 1, Se, dtype=torch.bool, device=q.device)], -1
                                )
                        else:
                            kr, vr = er, evr
                    if return_lse:
                        if fast_lse is not None:
                            try:
                                o, l = _fast_lse_attention(fast_lse, qr, kr, vr, key_valid, scale)
                            except RuntimeError:
                                fast_lse = None
                        if fast_lse is None:
                            o, l = _math_attention(qr, kr, vr, key_valid, scale)
                        lses.append(l)
                    else:
                        o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=key_valid, scale=scale)
                    outs.append(o)
                    rows_done.append(r + (b * Hm + hm) * nq)
    perm = torch.cat(rows_done)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    inv = inv.to(q.device)
    out = torch.cat(outs).index_select(0, inv)  # [B*Hm*nq, Hr, bq, Dv]
    out = out.reshape(B, Hm, nq, Hr, bq, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, H, nq * bq, Dv)[:, :, :Sq]
    if not return_lse:
        return out, None
    lse = torch.cat(lses).index_select(0, inv)
    lse = lse.reshape(B, Hm, nq, Hr, bq).permute(0, 1, 3, 2, 4).reshape(B, H, nq * bq)[:, :, :Sq]
    return out, lse
