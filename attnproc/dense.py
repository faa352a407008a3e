"""Method ``dense``: stock softmax attention through the whole machinery (the parity baseline)."""
from __future__ import annotations

from attnproc.kernels import dense_attention

from .method import Method
from .registry import register


@register
class Dense(Method):
    name = "dense"
    summary = "Stock softmax attention through attnproc's machinery; reproduces the unpatched pipeline."
    sdpa_extras = frozenset({"dropout_p", "is_causal", "enable_gqa"})
    context_parallel = frozenset({"ulysses", "ring"})

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None, **sdpa_kwargs):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale, **sdpa_kwargs)
