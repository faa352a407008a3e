"""The shared selection layer: box partitions, prefix keep, per-query chunk attention (vs the dense oracle)."""
from __future__ import annotations

import math

import pytest
import torch

from attnproc.kernels import dense_attention
from attnproc.sparse._tiles import tile_permutation
from attnproc.sparse.select import box_partition, chunk_attention, chunk_means, keep_first, keep_prefix


@pytest.mark.parametrize("grid,box", [((4, 6, 8), (2, 3, 4)), ((2, 4, 4), (2, 2, 2)), ((3, 4, 4), (3, 2, 2))])
def test_box_partition_is_tile_order_when_it_divides(grid, box):
    part = box_partition(grid, box)
    perm, inv = tile_permutation(grid, box)
    assert torch.equal(part.perm, perm) and torch.equal(part.inverse, inv)
    assert part.lengths == (math.prod(box),) * (math.prod(grid) // math.prod(box))


def test_ragged_boxes_cover_the_grid_with_boxes():
    grid, box = (5, 5, 7), (2, 2, 3)
    part = box_partition(grid, box)
    assert part.num_chunks == 3 * 3 * 3 and part.size == 175
    T, H, W = grid
    for c, (s, L) in enumerate(zip(part.starts.tolist(), part.lengths)):
        toks = part.perm[s:s + L]
        t, h, w = toks // (H * W), (toks // W) % H, toks % W
        ext = [int(x.max() - x.min()) + 1 for x in (t, h, w)]
        assert math.prod(ext) == L and all(e <= b for e, b in zip(ext, box))  # a (clipped) box, nothing else
    x = torch.randn(1, 1, 175, 3)
    torch.testing.assert_close(part.unpermute(part.permute(x)), x)
    means = chunk_means(part.permute(x), part)
    torch.testing.assert_close(means[0, 0, -1], x[0, 0, part.perm[part.starts[-1]:]].mean(0))


def test_keep_first_ties_go_to_the_lower_index():
    s = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    assert keep_first(s, torch.tensor([[3]])).tolist() == [[True, True, False, True, False]]


@pytest.mark.parametrize("extra", [0, 5])
def test_chunk_attention_equals_dense_and_backprops(extra):
    torch.manual_seed(extra)
    part = box_partition((3, 5, 6), (2, 2, 4))  # ragged: 12 chunks of 16, 8, 12, 6, 4 or 3 tokens
    B, H, N, D = 2, 3, part.size, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    sel = torch.rand(B, H, part.num_chunks, N) < 0.3
    sel[:, :, 0] |= ~sel.any(2)  # every query keeps a chunk
    ek = torch.randn(B, H, extra, D) if extra else None
    ev = torch.randn(B, H, extra, D) if extra else None
    out = chunk_attention(q, k, v, part, sel, 0.4, extra_k=ek, extra_v=ev, block_max=4)
    tok = sel.index_select(2, part.chunk_of).transpose(2, 3)  # [B, H, query, key]
    kk, vv = k, v
    if extra:
        tok = torch.cat([tok, torch.ones(B, H, N, extra, dtype=torch.bool)], -1)
        kk, vv = torch.cat([k, ek], 2), torch.cat([v, ev], 2)
    ref = dense_attention(q, kk, vv, attn_mask=tok, scale=0.4)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("ties", [False, True])
def test_keep_prefix_partial_sort_equals_full_sort(ties):
    torch.manual_seed(5)
    s = torch.rand(3, 5000)
    if ties:
        s = (s * 20).floor()  # many equal values: boundaries fall on ties, the full sort must take over
    need = torch.tensor([[0.05], [0.2], [0.4]]) * s.sum(-1, keepdim=True)

    def count_of(vals, complete):
        cond = vals.cumsum(-1) >= need
        first = cond.float().argmax(-1, keepdim=True) + 1
        return torch.where(cond.any(-1, keepdim=True), first, vals.shape[-1] if complete else 0)

    fast = keep_prefix(s, count_of, probes=(300, 1500))
    full = keep_prefix(s, count_of)
    assert torch.equal(fast, full)
    assert 0 < fast.sum() < s.numel()
