"""Scoped record of block-sparse kernel calls, for ``attnproc bench``: which backend ran, on how dense a mask,
in how much time.

Nothing is recorded outside a ``with record_kernel_calls() as calls:`` block (the record lives in a
``ContextVar`` that the block sets and resets), so normal calls pay one ``ContextVar.get`` and never synchronise.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

__all__ = ["record_kernel_calls", "recorded_run"]

_CALLS: ContextVar[list | None] = ContextVar("attnproc_kernel_calls", default=None)


@contextmanager
def record_kernel_calls() -> Iterator[list[dict]]:
    """Inside the block each ``block_sparse_attention`` call appends ``{"backend", "reason", "pairs",
    "kept_pairs", "ms"}``: query-key pairs of the call and those its mask keeps (extra keys count as kept),
    and its time (CUDA synchronised)."""
    token = _CALLS.set([])
    try:
        yield _CALLS.get()
    finally:
        _CALLS.reset(token)


def recorded_run(run: Callable[[], tuple], *, name: str, reason: str, q: torch.Tensor, k_len: int,
                 extra_len: int, block_mask: torch.Tensor, bq: int, bk: int) -> tuple:
    """``run()``, appended to the active record if there is one (else just called)."""
    calls = _CALLS.get()
    if calls is None:
        return run()
    B, H, Sq = q.shape[:3]
    cuda = q.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(q.device)
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize(q.device)
    ms = (time.perf_counter() - start) * 1e3
    # kept key tokens per query block row, ragged last block trimmed, averaged over the mask's (b, h) broadcast
    widths = torch.full((block_mask.shape[-1],), float(bk))
    widths[-1] = k_len - bk * (block_mask.shape[-1] - 1)
    heights = torch.full((block_mask.shape[-2],), float(bq))
    heights[-1] = Sq - bq * (block_mask.shape[-2] - 1)
    m = block_mask.detach().float().cpu()
    kept = float((heights[:, None] * m * widths[None, :]).sum((-1, -2)).mean()) * B * H
    kept += B * H * Sq * extra_len
    calls.append({"backend": name, "reason": reason, "pairs": B * H * Sq * (k_len + extra_len),
                  "kept_pairs": kept, "ms": ms})
    return result
