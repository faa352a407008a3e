"""Helpers for the kernel tests: a float64 reference straight from the definition (plain module, not a
conftest, so its name cannot clash with other test folders' conftest modules)."""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, block_mask, bq, bk, extra_k=None, extra_v=None, scale=None):
    """Float64 block-sparse attention from the definition: query token i attends key token j iff
    ``block_mask[b, h, i // bq, j // bk]``, plus every extra key. Returns (out, lse), differentiable."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    qi = torch.arange(Sq) // bq
    kj = torch.arange(Sk) // bk
    tok = block_mask.expand(B, H, *block_mask.shape[2:])[:, :, qi][:, :, :, kj]
    k64, v64 = k.double(), v.double()
    if extra_k is not None:
        tok = torch.cat([tok, torch.ones(B, H, Sq, extra_k.shape[2], dtype=torch.bool)], dim=-1)
        k64 = torch.cat([k64, extra_k.double()], dim=2)
        v64 = torch.cat([v64, extra_v.double()], dim=2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q.double() @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v64, lse


def random_block_mask(gen, shape, density=0.4, nonempty=True):
    m = torch.rand(shape, generator=gen) < density
    if nonempty:  # one guaranteed block per row
        col = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        m.scatter_(-1, col.unsqueeze(-1), True)
    return m

