"""GNA against NATTEN itself (its CPU build: the Flex backend) and the exact path against the dense oracle.

NATTEN is the oracle: ``pip install wheel && pip install --no-build-isolation natten==0.21.7`` (.ci/run does).
Its mask is read from its own outputs (zero q and k give a uniform softmax over the attended keys; identity
values show which keys those are), its outputs are compared with ours at <= 1e-5 in float32.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnproc
from attnproc.kernels import dense_attention
from attnproc.kernels.masked import masked_block_attention
from attnproc.sparse._tiles import auto_tile
from attnproc.sparse.gna import gna_mask, gna_plan
from attnproc.sparse.gna_exact import exact_gna_attention, gna_token_window

natten = pytest.importorskip("natten", reason="NATTEN is the oracle here: pip install wheel && pip install "
                                              "--no-build-isolation natten==0.21.7 (CI installs it)")

SWEEP = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def configs(draw):
    """A 1-, 2- or 3-D grid of at most ~200 tokens and a valid NATTEN configuration on it (even windows,
    strides, dilations, causal dimensions included)."""
    nd = draw(st.integers(1, 3))
    side = {1: 40, 2: 12, 3: 6}[nd]
    grid, k, s, d, c = [], [], [], [], []
    for _ in range(nd):
        L = draw(st.integers(2, side))
        di = draw(st.integers(1, max(1, L // 2)))
        ki = draw(st.integers(2, L // di))            # NATTEN: kernel_size >= 2
        grid.append(L), d.append(di), k.append(ki)
        s.append(draw(st.integers(1, ki)))
        c.append(draw(st.booleans()))
    if nd == 1 and k[0] == grid[0]:
        c[0] = False  # NATTEN runs this as plain causal attention, which its CPU Flex FMHA does not support
    return tuple(grid), tuple(k), tuple(s), tuple(d), tuple(c)


def _natten(q, k, v, grid, kernel_size, stride, dilation, causal):
    """NATTEN's na1d/na2d/na3d on [B, H, N, D] tensors (raster order)."""
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    b, h, n, _ = q.shape

    def heads_last(t):
        return t.transpose(1, 2).reshape(b, *grid, h, t.shape[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NATTEN's CPU Flex runs uncompiled and says so
        out = na(heads_last(q), heads_last(k), heads_last(v), kernel_size=kernel_size, stride=stride,
                 dilation=dilation, is_causal=causal)
    return out.reshape(b, n, h, -1).transpose(1, 2)


def natten_mask(grid, kernel_size, stride, dilation, causal) -> torch.Tensor:
    n = 1
    for L in grid:
        n *= L
    d = max(8, 1 << (n - 1).bit_length())   # NATTEN's CPU path: fp32/fp16/bf16, one power-of-two head dim >= 8
    zeros = torch.zeros(1, 1, n, d)
    out = _natten(zeros, zeros, torch.eye(n, d)[None, None], grid, kernel_size, stride, dilation, causal)[0, 0]
    return out[:, :n] > 0


@SWEEP
@given(configs())
def test_mask_equals_natten(cfg):
    assert torch.equal(gna_mask(*cfg), natten_mask(*cfg))


@SWEEP
@given(configs(), st.integers(0, 2**31 - 1))
def test_outputs_equal_natten(cfg, seed):
    """Our dense oracle and our exact (gather) path both match NATTEN to 1e-5 in float32."""
    grid = cfg[0]
    n = len(gna_mask(*cfg))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    theirs = _natten(q, k, v, *cfg)
    oracle = dense_attention(q, k, v, attn_mask=gna_mask(*cfg))
    plan = gna_plan(*cfg, tile=auto_tile(grid, 16))   # small tiles: full, partial and empty blocks mixed
    exact = exact_gna_attention(plan, gna_token_window(plan), q, k, v, backend="gather")
    torch.testing.assert_close(oracle, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact, theirs, atol=1e-5, rtol=0)


def test_exact_flex_path_equals_oracle_with_text():
    """The compiled-flex exact path (partial blocks carry the window as mask_mod; text keys in a padded, partial
    last extra block) equals the dense oracle, which the sweep above ties to NATTEN. One compile: seconds."""
    cfg = ((4, 8, 16), (2, 4, 6), (1, 2, 3), (1, 2, 1), (True, False, False))
    plan = gna_plan(*cfg, tile=(2, 4, 4))                         # 32-token blocks: flex-compatible
    assert not plan.aligned and bool((plan.block_mask & ~plan.full_block_mask).any())
    n = plan.perm.numel()
    q, k, v = (torch.randn(1, 2, n + 5, 16) for _ in range(3))
    with torch.no_grad():
        ours = exact_gna_attention(plan, gna_token_window(plan), q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                   extra_k=k[:, :, n:], extra_v=v[:, :, n:], backend="flex")
    mask = torch.cat([gna_mask(*cfg), torch.ones(n, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(ours, dense_attention(q[:, :, :n], k, v, attn_mask=mask), atol=1e-5, rtol=0)


def test_method_exact_path_equals_natten_backend():
    """GNA with a window that is not tile-aligned, text tokens after the video: the automatic exact path equals
    backend='natten' (NATTEN's na3d, text merged by LSE) to 1e-5."""
    layout = attnproc.TokenLayout(4, 8, 8, text_len=5, text_position="after")
    site = attnproc.Site("wan", "transformer", "blocks.3.attn1", 6, 3, "joint", layout, None)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    opts = dict(dense_first_steps=0, kernel_size=(3, 5, 5), stride=1, tile=(2, 4, 4))
    ours = attnproc.registry.REGISTRY.create("gna", **opts)
    assert not ours.plan_for(site).aligned
    theirs = attnproc.registry.REGISTRY.create("gna", backend="natten", **opts)
    torch.testing.assert_close(ours.attention(q, k, v, site), theirs.attention(q, k, v, site), atol=1e-5, rtol=0)


def test_window_test_is_the_mask_in_tile_order():
    cfg = ((6, 4, 10), (3, 4, 5), (2, 1, 3), (2, 1, 1), (False, True, False))
    plan = gna_plan(*cfg, tile=(2, 2, 5))
    i = torch.arange(plan.perm.numel())
    assert torch.equal(gna_token_window(plan)(i[:, None], i[None, :]), gna_mask(*cfg)[plan.perm][:, plan.perm])
    # full blocks really are full, and kept blocks cover the mask
    tiled = gna_mask(*cfg)[plan.perm][:, plan.perm].reshape(12, 20, 12, 20)
    assert torch.equal(plan.full_block_mask, tiled.all(3).all(1))
    assert torch.equal(plan.block_mask, tiled.any(3).any(1))


def test_masked_kernel_rejects_bad_lengths_and_backends():
    q = torch.randn(1, 1, 30, 8)
    ones = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiples of block_size=16"):
        masked_block_attention(q, q, q, ones, ones, lambda a, b: a >= 0, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_block_attention(q, q, q, ones, ones, lambda a, b: a >= 0, 15, backend="triton")
