"""Dense attention: the oracle every sparse backend is compared against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    **sdpa_kwargs,
) -> torch.Tensor:
    """Softmax attention over ``[B, H, S, D]`` tensors via SDPA (extra SDPA kwargs pass through)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, **sdpa_kwargs)
