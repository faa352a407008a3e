"""Exact log-sum-exp merge of partial attentions, and linear attention with a pluggable feature map."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["merge_attention", "linear_attention", "resolve_feature_map"]


def merge_attention(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax attentions over disjoint key sets into the attention over their union.

    ``out*``: ``[B, H, S, Dv]``; ``lse*``: ``[B, H, S]`` natural-log normalisers (``-inf`` for a part with no
    keys). Returns ``(out, lse)`` with ``out`` in ``out1``'s dtype and ``lse`` float32 (float64 if the inputs
    are float64; the arithmetic runs in that precision). Differentiable.
    """
    if out1.shape != out2.shape:
        raise ValueError(f"out1 {tuple(out1.shape)} and out2 {tuple(out2.shape)} must have the same shape")
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        if lse.shape != out1.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(lse.shape)}; expected {tuple(out1.shape[:-1])}")
    ct = torch.promote_types(torch.promote_types(lse1.dtype, lse2.dtype), torch.float32)
    l1, l2 = lse1.to(ct), lse2.to(ct)
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # both parts empty: keep weights finite
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    tot = w1 + w2
    lse = m + torch.log(tot)
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    oc = torch.promote_types(out1.dtype, ct)
    out = (out1.to(oc) * (w1 / safe).unsqueeze(-1) + out2.to(oc) * (w2 / safe).unsqueeze(-1)).to(out1.dtype)
    return out, lse


_FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def resolve_feature_map(name: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear-attention feature map ``"elu"`` (elu+1), ``"relu"`` or ``"softmax"`` (over the head dim); a
    callable is returned as is."""
    if isinstance(name, str):
        try:
            return _FEATURE_MAPS[name]
        except KeyError:
            raise ValueError(
                f"unknown feature_map {name!r}; expected one of {sorted(_FEATURE_MAPS)} or a callable"
            ) from None
    if callable(name):
        return name
    raise TypeError(f"feature_map must be a name or a callable; got {type(name).__name__}")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu",
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal linear attention ``out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)``.

    ``q, k``: ``[B, H, Sq|Sk, D]``, ``v``: ``[B, H, Sk, Dv]``. ``feature_map``: ``"elu"`` (elu+1), ``"relu"``,
    ``"softmax"`` (over the head dim) or a callable applied to q and k (it must return non-negative features).
    Computed in float32 (float64 for float64 inputs), returned in ``q``'s dtype. Cost ``O(S D Dv)``.
    """
    phi = resolve_feature_map(feature_map)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, S, D]")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, H, S]")
    ct = torch.promote_types(q.dtype, torch.float32)
    fq, fk = phi(q.to(ct)), phi(k.to(ct))
    kv = torch.einsum("bhsd,bhse->bhde", fk, v.to(ct))
    z = fk.sum(dim=2)  # [B, H, D]
    num = torch.einsum("bhsd,bhde->bhse", fq, kv)
    den = torch.einsum("bhsd,bhd->bhs", fq, z).unsqueeze(-1) + eps
    return (num / den).to(q.dtype)
