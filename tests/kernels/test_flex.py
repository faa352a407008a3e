"""flex backend (torch.compile(flex_attention) + BlockMask from block tables) against the definition.

Each distinct (shape, block size, dtype) compiles once (~2-9 s on CPU), so this file uses a handful of
fixed shapes and varies the mask *contents*, which reuse the compiled kernel.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnproc.kernels import BackendFallbackWarning, block_sparse_attention, num_blocks
from attnproc.kernels import _flex

from kernel_oracle import random_block_mask, reference_attention

pytestmark = pytest.mark.skipif(
    _flex.supports("cpu", needs_grad=False, return_lse=False, bq=64, bk=64) is not None,
    reason=f"flex cannot run on this CPU: {_flex.supports('cpu', needs_grad=False, return_lse=False, bq=64, bk=64)}",
)


def _inputs(seed, B, H, Sq, Sk, D, Dv, Se=0, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).requires_grad_(requires_grad)
    q, k, v = mk(B, H, Sq, D), mk(B, H, Sk, D), mk(B, H, Sk, Dv)
    ek, ev = (mk(B, H, Se, D), mk(B, H, Se, Dv)) if Se else (None, None)
    return q, k, v, ek, ev


Q1, K1, V1, _, _ = _inputs(0, 1, 2, 256, 256, 32, 32)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.0))
def test_flex_fp32_random_masks_one_compile(seed, density):
    gen = torch.Generator().manual_seed(seed)
    bm = random_block_mask(gen, (1, 1, 4, 4), density)
    out = block_sparse_attention(Q1, K1, V1, bm, 64, backend="flex")
    ref, _ = reference_attention(Q1, K1, V1, bm, 64, 64)
    assert (out.double() - ref).abs().max() <= 1e-5


def test_flex_ragged_per_head_extra_keys_rectangular_blocks():
    # Sq != Sk, neither a multiple of its block, per-(batch, head) masks, extra keys with a partial tile
    q, k, v, ek, ev = _inputs(1, 2, 2, 200, 150, 32, 16, Se=7)
    gen = torch.Generator().manual_seed(1)
    bm = random_block_mask(gen, (2, 2, num_blocks(200, 32), num_blocks(150, 64)), 0.4)
    bm[0, 0, 1] = False  # an empty row is fine with extra keys
    out, warned = None, []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = block_sparse_attention(q, k, v, bm, (32, 64), extra_k=ek, extra_v=ev, backend="flex")
        warned = [w for w in rec if issubclass(w.category, BackendFallbackWarning)]
    assert not warned  # flex really ran
    ref, _ = reference_attention(q, k, v, bm, 32, 64, ek, ev)
    assert out.shape == (2, 2, 200, 16)
    assert not torch.isnan(out).any()
    assert (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_half_precision(dtype):
    q, k, v, ek, ev = _inputs(2, 1, 2, 256, 256, 32, 32, Se=16, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    bm = random_block_mask(gen, (1, 2, 4, 4), 0.3)
    out = block_sparse_attention(q, k, v, bm, 64, extra_k=ek, extra_v=ev, backend="flex")
    assert out.dtype == dtype
    ref, _ = reference_attention(q, k, v, bm, 64, 64, ek, ev)
    assert (out.double() - ref).abs().max() <= 2e-2


def test_flex_block_mask_matches_table():
    gen = torch.Generator().manual_seed(3)
    bm = random_block_mask(gen, (2, 3, 5, 7), 0.4)
    fm = _flex.build_block_mask(bm, 32, 16, 150, 100, se=20)  # 100 % 16 != 0 and 20 % 16 != 0: partial tails
    dense = fm.to_dense().bool()
    expect = torch.cat([bm, torch.ones(2, 3, 5, 2, dtype=torch.bool)], dim=-1)
    assert torch.equal(dense, expect)
    # the tail key block and the tail extra block are partial (masked by length); the rest are full
    assert int(fm.kv_num_blocks.sum()) == int(bm[..., -1].sum()) + 2 * 3 * 5
    assert int(fm.full_kv_num_blocks.sum()) == int(bm[..., :-1].sum()) + 2 * 3 * 5


def test_flex_backward_on_cpu_falls_back_to_gather_with_reason():
    # torch 2.13 has no flex backward on CPU: the call is served by gather, with a warning saying why
    q, k, v, ek, ev = _inputs(4, 1, 2, 100, 70, 16, 16, Se=5, requires_grad=True)
    gen = torch.Generator().manual_seed(4)
    bm = random_block_mask(gen, (1, 2, 4, 3), 0.5)
    with pytest.warns(BackendFallbackWarning, match="no backward on CPU"):
        out, lse = block_sparse_attention(q, k, v, bm, 32, extra_k=ek, extra_v=ev, return_lse=True, backend="flex")
    (out.sum() + lse.sum()).backward()
    got = [t.grad.clone() for t in (q, k, v, ek, ev)]
    for t in (q, k, v, ek, ev):
        t.grad = None
    ro, rl = reference_attention(q, k, v, bm, 32, 32, ek, ev)
    (ro.sum() + rl.sum()).backward()
    for g, t in zip(got, (q, k, v, ek, ev)):
        assert (g.double() - t.grad).abs().max() <= 1e-5


def test_flex_lse_on_cpu_falls_back_with_reason():
    gen = torch.Generator().manual_seed(5)
    bm = random_block_mask(gen, (1, 1, 4, 4), 0.5)
    with pytest.warns(BackendFallbackWarning, match="LSE"):
        out, lse = block_sparse_attention(Q1, K1, V1, bm, 64, return_lse=True, backend="flex")
    ref, ref_lse = reference_attention(Q1, K1, V1, bm, 64, 64)
    assert (lse.double() - ref_lse).abs().max() <= 1e-5
    assert (out.double() - ref).abs().max() <= 1e-5


def test_flex_non_power_of_two_block_falls_back():
    q, k, v, _, _ = _inputs(6, 1, 1, 96, 96, 16, 16)
    bm = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.warns(BackendFallbackWarning, match="power-of-two"):
        out = block_sparse_attention(q, k, v, bm, 48, backend="flex")
    ref, _ = reference_attention(q, k, v, bm, 48, 48)
    assert (out.double() - ref).abs().max() <= 1e-5
