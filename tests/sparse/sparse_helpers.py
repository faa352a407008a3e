"""Shared helpers for the sparse-method tests: run a tiny pipeline and capture the method's calls."""
from __future__ import annotations

import numpy as np
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline  # noqa: F401

# (num_frames, height, width) per family; the first size gives a token count that is not a multiple of 128
SIZES = {
    "wan21": [(9, 128, 128), (13, 128, 192)],
    "wan22": [(9, 128, 128), (5, 160, 128)],
    "hunyuanvideo": [(9, 128, 128), (13, 128, 192)],
    "cogvideox": [(9, 128, 128), (13, 128, 192)],
    "ltx": [(9, 192, 160), (17, 256, 256)],
    "flux": [(None, 128, 128), (None, 160, 96)],
}


def call_kwargs(family, size, **over):
    f, h, w = size
    kw = dict(height=h, width=w, num_inference_steps=2, output_type="latent")
    if f is not None:
        kw["num_frames"] = f
    kw.update(over)
    kw = tiny_call_kwargs(family, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    return kw


def output(result):
    x = result.frames if hasattr(result, "frames") else result.images
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def capture(handle, limit=6):
    """Wrap the applied method so its first ``limit`` sparse-eligible calls are recorded with their output."""
    method = handle.method
    inner = method.attention
    calls = []

    def attention(q, k, v, site, *, attn_mask=None, scale=None):
        out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if site.kind != "cross" and len(calls) < limit:
            calls.append((q, k, v, site, attn_mask, scale, out))
        return out

    method.attention = attention
    return calls


def masked_dense(method, q, k, v, site, attn_mask, scale):
    """Dense attention restricted to the method's token mask (and the call's own mask)."""
    tm = method.token_mask(site, q.shape[2], k.shape[2])
    mask = attn_mask
    if tm is not None:
        tm = tm[None]  # [1, 1, q, k]
        if mask is None:
            mask = tm
        elif mask.dtype == torch.bool:
            mask = mask & tm
        else:
            mask = mask.masked_fill(~tm, float("-inf"))
    return dense_attention(q, k, v, attn_mask=mask, scale=scale)


def assert_matches_masked_dense(method, calls, atol=2e-5):
    assert calls, "no attention call was captured"
    for q, k, v, site, attn_mask, scale, out in calls:
        ref = masked_dense(method, q, k, v, site, attn_mask, scale)
        assert torch.isfinite(out).all()
        err = (out - ref).abs().max().item()
        assert err <= atol * max(1.0, ref.abs().max().item()), (site.name, site.kind, err)
