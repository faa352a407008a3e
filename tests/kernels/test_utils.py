"""Block-mask utilities, LSE merge and linear attention against their direct definitions."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnproc.kernels import (
    block_mask_to_index,
    block_to_token_mask,
    index_to_block_mask,
    linear_attention,
    merge_attention,
    normalize_block_size,
    num_blocks,
    pad_to_blocks,
    token_to_block_mask,
)

FAST = settings(max_examples=40, deadline=None)


def test_normalize_block_size():
    assert normalize_block_size(64) == (64, 64)
    assert normalize_block_size((32, 128)) == (32, 128)
    with pytest.raises(ValueError, match="bk"):
        normalize_block_size((32, 0))
    with pytest.raises(TypeError):
        normalize_block_size("64")


@FAST
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_index_table_round_trip(h, nq, nk, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, h, nq, nk, generator=gen) < density
    indices, counts = block_mask_to_index(mask)
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(counts, mask.sum(-1).int())
    for b in range(2):
        for hh in range(h):
            for i in range(nq):
                c = int(counts[b, hh, i])
                expect = torch.nonzero(mask[b, hh, i]).flatten().tolist()
                assert indices[b, hh, i, :c].tolist() == expect  # sorted kept blocks
                assert (indices[b, hh, i, c:] == -1).all()  # padding
    assert torch.equal(index_to_block_mask(indices, counts, nk), mask)
    # a wider table round-trips too
    wide, _ = block_mask_to_index(mask, width=nk + 2)
    assert wide.shape[-1] == nk + 2
    assert torch.equal(index_to_block_mask(wide, counts, nk), mask)


def test_index_table_errors():
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="width"):
        block_mask_to_index(mask, width=2)
    with pytest.raises(TypeError, match="bool"):
        block_mask_to_index(mask.int())
    idx = torch.tensor([[[[0, 5]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        index_to_block_mask(idx, torch.tensor([[[2]]], dtype=torch.int32), 3)


@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4, 8]), st.sampled_from([1, 2, 5, 8]),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_token_to_block_mask_exact(sq, sk, bq, bk, density, seed):
    gen = torch.Generator().manual_seed(seed)
    tok = torch.rand(2, sq, sk, generator=gen) < density * 0.3
    bm, waste = token_to_block_mask(tok, (bq, bk))
    nq, nk = num_blocks(sq, bq), num_blocks(sk, bk)
    assert bm.shape == (2, nq, nk)
    kept_area = kept_tokens = 0
    for b in range(2):
        for i in range(nq):
            for j in range(nk):
                tile = tok[b, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert bool(bm[b, i, j]) == bool(tile.any())
                if tile.any():
                    kept_area += tile.numel()
                    kept_tokens += int(tile.sum())
    expect = 0.0 if kept_area == 0 else 1 - kept_tokens / kept_area
    assert waste == pytest.approx(expect, abs=1e-12)
    # the expanded block mask covers the token mask, and expands back exactly
    back = block_to_token_mask(bm, (bq, bk), sq, sk)
    assert back.shape == tok.shape
    assert not (tok & ~back).any()
    qi, kj = torch.arange(sq) // bq, torch.arange(sk) // bk
    assert torch.equal(back, bm[:, qi][:, :, kj])


def test_block_aligned_mask_has_no_waste():
    bm = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    tok = block_to_token_mask(bm, (4, 2), 7, 5)
    back, waste = token_to_block_mask(tok, (4, 2))
    assert torch.equal(back, bm) and waste == 0.0
    with pytest.raises(ValueError, match="ceil"):
        block_to_token_mask(bm, 4, 9, 5)


def test_pad_to_blocks():
    x = torch.randn(2, 3, 10, 4)
    p, n = pad_to_blocks(x, 4)
    assert n == 10 and p.shape == (2, 3, 12, 4)
    assert torch.equal(p[:, :, :10], x) and (p[:, :, 10:] == 0).all()
    same, _ = pad_to_blocks(x, 5)
    assert same is x
    p1, _ = pad_to_blocks(x, 4, dim=1)
    assert p1.shape == (2, 4, 10, 4)


def _softmax_part(q, k, v):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


@pytest.mark.parametrize("split", [1, 5, 11])
def test_merge_equals_joint_softmax(split):
    gen = torch.Generator().manual_seed(split)
    q = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 12, 8, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(2, 3, 12, 5, generator=gen, dtype=torch.float64)
    o1, l1 = _softmax_part(q, k[:, :, :split], v[:, :, :split])
    o2, l2 = _softmax_part(q, k[:, :, split:], v[:, :, split:])
    out, lse = merge_attention(o1, l1, o2, l2)
    ref, ref_lse = _softmax_part(q, k, v)
    assert (out - ref).abs().max() < 1e-12
    assert (lse - ref_lse).abs().max() < 1e-12
    # float32 parts: float32 result within round-off
    out32, lse32 = merge_attention(o1.float(), l1.float(), o2.float(), l2.float())
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() < 1e-5
    assert (lse32.double() - ref_lse).abs().max() < 1e-5


def test_merge_with_empty_part():
    o1 = torch.randn(1, 2, 4, 3)
    l1 = torch.randn(1, 2, 4)
    empty_o, empty_l = torch.zeros_like(o1), torch.full_like(l1, float("-inf"))
    out, lse = merge_attention(o1, l1, empty_o, empty_l)
    assert torch.allclose(out, o1) and torch.allclose(lse, l1)
    out, lse = merge_attention(empty_o, empty_l, empty_o, empty_l)
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="lse2"):
        merge_attention(o1, l1, o1, l1[..., :2])


def _linear_reference(q, k, v, phi, eps):
    fq, fk = phi(q), phi(k)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[2]):
        w = (fq[:, :, i:i + 1] * fk).sum(-1)  # [B, H, Sk] = phi(q_i) . phi(k_j)
        out[:, :, i] = (w.unsqueeze(-1) * v).sum(2) / (w.sum(-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize(
    "name,phi",
    [
        ("elu", lambda x: torch.nn.functional.elu(x) + 1),
        ("relu", torch.relu),
        ("softmax", lambda x: torch.softmax(x, -1)),
        (lambda x: x * x, lambda x: x * x),
    ],
)
def test_linear_attention_formula(name, phi):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 9, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 11, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 11, 4, generator=gen, dtype=torch.float64)
    out = linear_attention(q, k, v, feature_map=name, eps=1e-6)
    ref = _linear_reference(q.float().double(), k.float().double(), v.float().double(), phi, 1e-6)
    assert out.shape == (2, 2, 9, 4)
    assert (out - ref).abs().max() < 1e-4


def test_linear_attention_errors():
    x = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(x, x, x, feature_map="tanh")
    with pytest.raises(ValueError, match="head dim"):
        linear_attention(x, torch.randn(1, 1, 3, 5), x)
