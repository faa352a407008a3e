"""FlexAttention backend: ``torch.compile(flex_attention)`` with a ``BlockMask`` built from block tables.

The key sequence handed to flex is ``[k padded to nk*bk | extra_k padded to ne*bk]``; extra keys are extra
key blocks that every query block attends, so one kernel computes the exact joint softmax. Blocks that
contain padding (the last key block when ``Sk % bk != 0``, the last extra block when ``Se % bk != 0``) are
*partial* blocks with a length ``mask_mod``; every other kept block is a *full* block (no mask_mod call).

torch 2.13 on CPU: the compiled CPU kernel is inference-only and cannot return the LSE, and flex has no CPU
backward at all; ``supports()`` reports that and the caller falls back to the gather backend.
"""
from __future__ import annotations

import functools
import shutil
import os

import torch

from .blockmask import num_blocks, pad_to_blocks

_RECOMPILE_LIMIT = 64


def available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cpu_compiler_available() -> bool:
    """Inductor's CPU backend needs a C++ compiler."""
    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


def _power_of_two(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


def supports(device_type: str, *, needs_grad: bool, return_lse: bool, bq: int, bk: int) -> str | None:
    """``None`` if flex can serve the request, otherwise the reason it cannot."""
    if not available():
        return "torch.nn.attention.flex_attention is not importable in this torch"
    if not (_power_of_two(bq) and _power_of_two(bk)):
        return f"flex needs power-of-two block sizes >= 16; got ({bq}, {bk})"
    if device_type == "cpu":
        if needs_grad:
            return "flex_attention has no backward on CPU (torch 2.13)"
        if return_lse:
            return "compiled flex_attention on CPU cannot return the LSE (torch 2.13)"
        if not cpu_compiler_available():
            return "torch.compile on CPU needs a C++ compiler and none was found"
    elif device_type != "cuda":
        return f"flex backend supports cpu and cuda tensors; got device type {device_type!r}"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # static shapes: one specialisation per (shape, block size, dtype); the mask *contents* are graph inputs,
    # so new masks of the same shape reuse the compiled kernel
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=256)
def _length_mask_mod(sk: int, k_pad: int, se: int):
    """Keys beyond the real sequence (padding of k and of extra_k) are never attended. Memoised so the same
    function object is reused (dynamo guards on it)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < sk) | ((kv_idx >= k_pad) & (kv_idx < k_pad + se))

    return mask_mod


def _table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(-1, dtype=torch.int32)
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts, idx


def build_block_mask(block_mask: torch.Tensor, bq: int, bk: int, sq: int, sk: int, se: int = 0,
                     *, compute_q_blocks: bool = True):
    """flex ``BlockMask`` for a block mask ``[B|1, H|1, nq, nk]`` plus ``se`` extra keys (all attended)."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = num_blocks(sq, bq), num_blocks(sk, bk)
    ne = num_blocks(se, bk) if se else 0
    mask = block_mask
    if ne:
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], ne)], dim=-1)
    partial_cols = torch.zeros(nk + ne, dtype=torch.bool, device=mask.device)
    if sk % bk:
        partial_cols[nk - 1] = True
    if ne and se % bk:
        partial_cols[nk + ne - 1] = True
    full_cnt, full_idx = _table(mask & ~partial_cols)
    if bool(partial_cols.any()):
        part_cnt, part_idx = _table(mask & partial_cols)
        mask_mod = _length_mask_mod(sk, nk * bk, se)
    else:
        part_cnt = torch.zeros_like(full_cnt)
        part_idx = torch.zeros_like(full_idx)  # a distinct tensor: aliasing the full table breaks inductor
        mask_mod = None
    return BlockMask.from_kv_blocks(
        part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
        seq_lengths=(nq * bq, (nk + ne) * bk), compute_q_blocks=compute_q_blocks,
    )


def flex_attention_blocks(q, k, v, block_mask, bq, bk, scale, extra_k=None, extra_v=None, return_lse=False,
                          *, needs_grad=False):
    Sq, Sk = q.shape[2], k.shape[2]
    se = extra_k.shape[2] if extra_k is not None else 0
    qp, _ = pad_to_blocks(q, bq)
    kp, _ = pad_to_blocks(k, bk)
    vp, _ = pad_to_blocks(v, bk)
    if se:
        ekp, _ = pad_to_blocks(extra_k, bk)
        evp, _ = pad_to_blocks(extra_v, bk)
        kp = torch.cat([kp, ekp], dim=2)
        vp = torch.cat([vp, evp], dim=2)
    bm = build_block_mask(block_mask, bq, bk, Sq, Sk, se, compute_q_blocks=needs_grad)
    fn = _compiled_flex()
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                    accumulated_recompile_limit=max(256, _RECOMPILE_LIMIT)):
        res = fn(qp, kp, vp, block_mask=bm, scale=scale, return_lse=return_lse)
    if return_lse:
        out, lse = res
        return out[:, :, :Sq], lse[:, :, :Sq].float()
    return res[:, :, :Sq], None


@functools.lru_cache(maxsize=64)
def _token_mask_mod(token_mask, sk: int, se: int):
    """``token_mask`` on the visual keys, every real extra key after them. Memoised per ``token_mask`` object so
    dynamo sees the same function for the same mask."""

    def mask_mod(b, h, q_idx, kv_idx):
        visual = kv_idx < sk
        return (visual & token_mask(q_idx, torch.clamp(kv_idx, max=sk - 1))) | (~visual & (kv_idx < sk + se))

    return mask_mod


def flex_attention_token_masked(q, k, v, kept, full, token_mask, bs, scale, extra_k=None, extra_v=None):
    """Compiled flex attention over ``[k | extra_k]``: full blocks (``kept & full``) attend every pair, partial
    blocks (``kept & ~full``) evaluate ``token_mask(q_idx, kv_idx)``; lengths of q and k are multiples of ``bs``
    (see :func:`kernels.masked.masked_block_attention`)."""
    from torch.nn.attention.flex_attention import BlockMask

    Sq, Sk = q.shape[2], k.shape[2]
    se = extra_k.shape[2] if extra_k is not None else 0
    full, partial = kept & full, kept & ~full
    if se:
        ne = num_blocks(se, bs)
        ekp, _ = pad_to_blocks(extra_k, bs)
        evp, _ = pad_to_blocks(extra_v, bs)
        k, v = torch.cat([k, ekp], 2), torch.cat([v, evp], 2)
        tail = torch.zeros(ne, dtype=torch.bool, device=kept.device)
        tail[-1] = se % bs != 0                                # a padded last extra block is partial
        full = torch.cat([full, (~tail).expand(full.shape[0], ne)], 1)
        partial = torch.cat([partial, tail.expand(partial.shape[0], ne)], 1)
    full_cnt, full_idx = _table(full[None, None])
    part_cnt, part_idx = _table(partial[None, None])
    bm = BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(bs, bs),
                                  mask_mod=_token_mask_mod(token_mask, Sk, se), seq_lengths=(Sq, k.shape[2]),
                                  compute_q_blocks=False)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                    accumulated_recompile_limit=max(256, _RECOMPILE_LIMIT)):
        return _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
