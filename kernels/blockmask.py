"""Block-mask utilities shared by every block-sparse method.

Conventions
-----------
* A *block mask* is a bool tensor ``[B or 1, H or 1, nq, nk]`` with ``nq = ceil(Sq / bq)`` and
  ``nk = ceil(Sk / bk)``: entry ``(b, h, i, j)`` says query block ``i`` attends key block ``j``.
* An *index table* is the same information per row: ``indices[..., i, :counts[..., i]]`` are the kept key
  blocks of query block ``i`` in ascending order; the remaining entries are padding (``-1``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "normalize_block_size",
    "num_blocks",
    "block_mask_to_index",
    "index_to_block_mask",
    "token_to_block_mask",
    "block_to_token_mask",
    "pad_to_blocks",
]


def normalize_block_size(block_size: int | Sequence[int]) -> tuple[int, int]:
    """``128 -> (128, 128)``; ``(bq, bk)`` is returned as a tuple. Sizes must be positive ints."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        bq = bk = block_size
    elif isinstance(block_size, (str, bytes)):
        raise TypeError(f"block_size must be an int or a pair (bq, bk); got {block_size!r}")
    else:
        try:
            bq, bk = block_size  # type: ignore[misc]
        except (TypeError, ValueError):
            raise TypeError(f"block_size must be an int or a pair (bq, bk); got {block_size!r}") from None
    for name, b in (("bq", bq), ("bk", bk)):
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"block_size {name} must be a positive int; got {b!r}")
    return int(bq), int(bk)


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``length`` tokens (``ceil``)."""
    return -(-int(length) // int(block))


def block_mask_to_index(block_mask: torch.Tensor, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask ``[..., nq, nk]`` -> ``(indices [..., nq, width] int32, counts [..., nq] int32)``.

    ``indices`` lists each row's kept key blocks in ascending order, padded with ``-1``. ``width`` defaults to
    the largest count (at least 1); a smaller width than some row's count is an error.
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor; got dtype {block_mask.dtype}")
    if block_mask.dim() < 1:
        raise ValueError("block_mask must have at least one dimension (the key-block axis)")
    nk = block_mask.shape[-1]
    counts = block_mask.sum(-1, dtype=torch.int32)
    # a stable descending sort of 0/1 puts the kept blocks first, in ascending block order
    order = torch.sort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
    max_count = int(counts.max()) if counts.numel() else 0
    if width is None:
        width = max(max_count, 1)
    elif width < max_count:
        raise ValueError(f"width={width} is smaller than the largest row count {max_count}")
    if width > nk:
        order = F.pad(order, (0, width - nk))
    order = order[..., :width].to(torch.int32)
    pos = torch.arange(width, device=block_mask.device, dtype=torch.int32)
    indices = torch.where(pos < counts.unsqueeze(-1), order, torch.full_like(order, -1))
    return indices.contiguous(), counts


def index_to_block_mask(indices: torch.Tensor, counts: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_index`: ``(indices [..., nq, w], counts [..., nq]) -> bool [..., nq, nk]``.

    Only the first ``counts`` entries of each row are read (padding is ignored); indices must lie in
    ``[0, num_k_blocks)``.
    """
    if indices.shape[:-1] != counts.shape:
        raise ValueError(
            f"indices {tuple(indices.shape)} and counts {tuple(counts.shape)} disagree: expected "
            f"counts.shape == indices.shape[:-1]"
        )
    w = indices.shape[-1]
    valid = torch.arange(w, device=indices.device) < counts.unsqueeze(-1).to(torch.long)
    idx = indices.to(torch.long)
    if bool(((idx < 0) | (idx >= num_k_blocks))[valid].any()):
        raise ValueError(f"indices out of range [0, {num_k_blocks}) in the counted entries")
    mask = torch.zeros(*indices.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=indices.device)
    # padding entries scatter into a spare column that is dropped
    idx = torch.where(valid, idx, torch.full_like(idx, num_k_blocks))
    mask.scatter_(-1, idx, True)
    return mask[..., :num_k_blocks]


def block_to_token_mask(
    block_mask: torch.Tensor, block_size: int | Sequence[int], q_len: int, k_len: int
) -> torch.Tensor:
    """Expand a block mask ``[..., nq, nk]`` to a token mask ``[..., q_len, k_len]`` (bool)."""
    bq, bk = normalize_block_size(block_size)
    nq, nk = num_blocks(q_len, bq), num_blocks(k_len, bk)
    if tuple(block_mask.shape[-2:]) != (nq, nk):
        raise ValueError(
            f"block_mask has {tuple(block_mask.shape[-2:])} blocks; expected (ceil({q_len}/{bq}), "
            f"ceil({k_len}/{bk})) = ({nq}, {nk})"
        )
    tok = block_mask.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
    return tok[..., :q_len, :k_len]


def token_to_block_mask(
    token_mask: torch.Tensor, block_size: int | Sequence[int]
) -> tuple[torch.Tensor, float]:
    """Token mask ``[..., Sq, Sk]`` (bool, True = attend) -> ``(block_mask [..., nq, nk], waste)``.

    A block is kept if any of its tokens is kept, so the block-sparse attention over it covers the token mask.
    ``waste`` is the fraction of (real, in-range) token pairs inside kept blocks that the token mask masks out:
    0.0 means the mask is block-aligned, 0.9 means 90% of the computed scores are thrown away.
    """
    if token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be a bool tensor; got dtype {token_mask.dtype}")
    bq, bk = normalize_block_size(block_size)
    sq, sk = token_mask.shape[-2:]
    nq, nk = num_blocks(sq, bq), num_blocks(sk, bk)
    padded = F.pad(token_mask, (0, nk * bk - sk, 0, nq * bq - sq))
    tiles = padded.reshape(*token_mask.shape[:-2], nq, bq, nk, bk)
    kept_tokens = tiles.sum(dim=(-3, -1))  # [..., nq, nk]
    block_mask = kept_tokens > 0
    # real token pairs per block (edge blocks are partial)
    rows = torch.full((nq,), bq, dtype=torch.float64)
    rows[-1] = sq - (nq - 1) * bq
    cols = torch.full((nk,), bk, dtype=torch.float64)
    cols[-1] = sk - (nk - 1) * bk
    area = (rows[:, None] * cols[None, :]).to(token_mask.device)
    total = float((area * block_mask).sum())
    waste = 0.0 if total == 0 else 1.0 - float(kept_tokens.sum()) / total
    return block_mask, waste


def pad_to_blocks(x: torch.Tensor, block: int, dim: int = -2) -> tuple[torch.Tensor, int]:
    """Zero-pad ``x`` along ``dim`` to a multiple of ``block``; returns ``(padded, original_length)``.

    Returns ``x`` itself (no copy) when it is already a multiple.
    """
    n = x.shape[dim]
    target = num_blocks(n, block) * block
    if target == n:
        return x, n
    d = dim % x.dim()
    pad = [0, 0] * (x.dim() - d - 1) + [0, target - n]
    return F.pad(x, pad), n
