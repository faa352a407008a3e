"""VMoBA: the token mask against a loop-by-loop reading of the reference, attention against the dense oracle on
that mask, gradients, ragged grids, defaults and bad input."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from attnproc.kernels import dense_attention
from attnproc.layout import TokenLayout
from attnproc.options import OptionError, build_config
from attnproc.sparse.vmoba import (
    VMoBAConfig, default_chunk, vmoba_partition, vmoba_token_mask, vmoba_visual_attention,
)

EPS = 1e-6


# ---- a literal, loop-based statement of what the reference computes -----------------------------------------
def chunk_ids(grid, chunk):
    """Chunk of each raster token, chunks numbered in the reference's order (boxes in raster order)."""
    T, H, W = grid
    ids = []
    for t in range(T):
        for h in range(H):
            for w in range(W):
                i = (t * H + h) * W + w
                if isinstance(chunk, (int, float)):
                    ids.append(i // int(chunk * H * W))
                elif len(chunk) == 2:
                    ch, cw = chunk
                    ids.append((h // ch) * math.ceil(W / cw) + w // cw)
                else:
                    ct, ch, cw = chunk
                    nh, nw = math.ceil(H / ch), math.ceil(W / cw)
                    ids.append(((t // ct) * nh + h // ch) * nw + w // cw)
    return ids


def layout_positions(ids):
    """Position of each raster token in the reference's permuted order (chunk by chunk, raster inside)."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    pos = [0] * len(ids)
    for p, i in enumerate(order):
        pos[i] = p
    return pos


def pick_threshold(entries, tau, sort_own):
    """entries: (value, is_own, tiebreak, key). Min-max normalise, own share, sort the others, cumulative rule."""
    vals = [e[0] for e in entries]
    lo, hi = min(vals), max(vals)
    den = hi - lo if hi - lo > EPS else 1.0
    norm = [(v - lo) / den for v in vals]
    total = sum(norm)
    own = sum(n for n, e in zip(norm, entries) if e[1])
    remain = max(tau - own / (total + EPS), 0.0)
    cand = [(0.0 if e[1] else n, e[2], e[3]) for n, e in zip(norm, entries) if sort_own or not e[1]]
    cand.sort(key=lambda c: (-c[0], c[1]))
    run, chosen = 0.0, []
    for val, _, key in cand:
        run += val
        chosen.append(key)
        if run / (total + EPS) >= remain:
            break
    return set(chosen) | {e[3] for e in entries if e[1]}


def pick_topk(entries, n):
    ranked = sorted(entries, key=lambda e: (-(e[0] + (1e9 if e[1] else 0.0)), e[2]))
    return {e[3] for e in ranked[:n]}


def literal_mask(q, k, grid, chunk, select, ttype, tau, topk):
    B, Hh, S, D = q.shape
    ids = chunk_ids(grid, chunk)
    pos = layout_positions(ids)
    C = max(ids) + 1
    ql, kl = q.double().tolist(), k.double().tolist()
    out = torch.zeros(B, Hh, S, S, dtype=torch.bool)
    for b in range(B):
        gate = {}
        for h in range(Hh):
            for c in range(C):
                members = [j for j in range(S) if ids[j] == c]
                kbar = [sum(kl[b][h][j][d] for j in members) / len(members) for d in range(D)]
                for s in range(S):
                    gate[h, c, s] = sum(a * x for a, x in zip(kbar, ql[b][h][s]))
        ent = lambda h, c, s, tie: (gate[h, c, s], ids[s] == c, tie, (h, c, s))  # noqa: E731
        chosen = set()
        kk = min(topk, C)
        if ttype == "query_head":
            for h in range(Hh):
                for s in range(S):
                    es = [ent(h, c, s, c) for c in range(C)]
                    chosen |= pick_topk(es, kk) if select == "topk" else pick_threshold(es, tau, True)
        elif ttype == "head_global":
            for h in range(Hh):
                es = [ent(h, c, s, c * S + pos[s]) for c in range(C) for s in range(S)]
                chosen |= pick_topk(es, kk * S) if select == "topk" else pick_threshold(es, tau, True)
        elif ttype == "block":
            for c in range(C):
                es = [ent(h, c, s, h * S + pos[s]) for h in range(Hh) for s in range(S)]
                chosen |= pick_threshold(es, tau, True)
        else:
            es = [ent(h, c, s, (c * Hh + h) * S + pos[s]) for c in range(C) for h in range(Hh) for s in range(S)]
            chosen |= pick_topk(es, kk * Hh * S) if select == "topk" else pick_threshold(es, tau, False)
        ids_t = torch.tensor(ids)
        for h, c, s in chosen:
            out[b, h, s] |= ids_t == c
    return out


MODES = [("topk", "query_head"), ("topk", "head_global"), ("topk", "overall"), ("threshold", "query_head"),
         ("threshold", "head_global"), ("threshold", "block"), ("threshold", "overall")]
CASES = [  # grid, chunk
    ((4, 3, 4), 1), ((5, 3, 4), 2), ((4, 4, 6), (2, 3)), ((3, 4, 4), (1, 2, 2)),
    ((5, 4, 5), (2, 3)), ((5, 5, 7), (2, 2, 3)), ((6, 2, 3), 1.5),  # ragged / fractional chunks
]


@pytest.mark.parametrize("select,ttype", MODES)
@pytest.mark.parametrize("grid,chunk", CASES)
def test_mask_matches_literal_reference(grid, chunk, select, ttype):
    torch.manual_seed(zlib.crc32(repr((grid, chunk, select, ttype)).encode()) % 1000)
    S = math.prod(grid)
    q, k = torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 8)
    for tau, topk in ((0.25, 2), (0.6, 1)):
        got = vmoba_token_mask(q, k, grid, chunk, select=select, threshold_type=ttype, tau=tau, topk=topk)
        want = literal_mask(q, k, grid, chunk, select, ttype, tau, topk)
        assert got.dtype == torch.bool and got.shape == (2, 2, S, S)
        assert torch.equal(got, want), (grid, chunk, select, ttype, tau)
        assert got.any(-1).all()  # never an empty row


def test_mask_is_sparse_and_keeps_own_chunk():
    torch.manual_seed(0)
    grid, chunk = (4, 8, 8), (2, 4, 4)
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    m = vmoba_token_mask(q, k, grid, chunk, select="topk", topk=2)
    ids = torch.tensor(chunk_ids(grid, chunk))
    own = ids[:, None] == ids[None, :]
    assert (m | ~own).all()
    assert m.float().mean().item() == pytest.approx(2 / 8)  # exactly two 32-token chunks of eight per query


def _cfg(**kw):
    return VMoBAConfig(**kw).resolved("wan")


@pytest.mark.parametrize("grid", [(4, 6, 8), (7, 5, 6)])
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("setting", ["training_free", "training"])
def test_visual_attention_equals_dense_on_the_mask(grid, layer, setting):
    torch.manual_seed(layer)
    S = math.prod(grid)
    q, k, v = (torch.randn(2, 3, S, 16) for _ in range(3))
    cfg = _cfg(setting=setting, chunk_1d=2, chunk_2d=(3, 4), chunk_3d=(2, 3, 3))  # small grids: explicit chunks
    layout = TokenLayout(*grid)
    out = vmoba_visual_attention(q, k, v, None, None, 0.3, config=cfg, layout=layout, layer_index=layer)
    chunk = cfg.chunk_for(grid, layer)
    part = vmoba_partition(grid, chunk)
    m = vmoba_token_mask(q, k, grid, chunk, select=cfg.select, threshold_type=cfg.threshold_type, tau=cfg.tau,
                         topk=cfg.topk_for(part.num_chunks))
    ref = dense_attention(q, k, v, attn_mask=m, scale=0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert m.float().mean() < 0.9  # the comparison is against a sparse pattern, not dense attention
    again, density = vmoba_visual_attention(q, k, v, None, None, 0.3, config=cfg, layout=layout, layer_index=layer,
                                            return_density=True)
    assert torch.equal(again, out) and density == pytest.approx(float(m.double().mean()), abs=1e-12)


def test_extra_keys_join_the_softmax():
    torch.manual_seed(1)
    grid = (4, 4, 6)
    S = math.prod(grid)
    q, k, v = (torch.randn(1, 2, S, 8) for _ in range(3))
    ek, ev = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    cfg = _cfg(chunk_3d=(2, 2, 3))
    out = vmoba_visual_attention(q, k, v, ek, ev, None, config=cfg, layout=TokenLayout(*grid), layer_index=2)
    m = vmoba_token_mask(q, k, grid, (2, 2, 3), select="topk", topk=cfg.topk_for(8))
    m = torch.cat([m, torch.ones(1, 2, S, 7, dtype=torch.bool)], -1)
    ref = dense_attention(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2), attn_mask=m)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_gradients_match_dense_on_the_mask():
    torch.manual_seed(2)
    grid = (4, 5, 6)
    S = math.prod(grid)
    base = [torch.randn(1, 2, S, 8, dtype=torch.float64) for _ in range(3)]
    cfg = _cfg(setting="training")
    m = None
    grads = []
    for sparse in (True, False):
        q, k, v = (t.clone().float().requires_grad_() for t in base)
        if sparse:
            out = vmoba_visual_attention(q, k, v, None, None, None, config=cfg, layout=TokenLayout(*grid),
                                         layer_index=1)
            chunk = cfg.chunk_for(grid, 1)
            m = vmoba_token_mask(q.detach(), k.detach(), grid, chunk, select="threshold",
                                 threshold_type="head_global", tau=0.25)
        else:
            out = dense_attention(q, k, v, attn_mask=m)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("grid", [(21, 30, 52), (24, 36, 64), (1, 1, 1), (2, 7, 3), (13, 17, 31), (8, 32, 32)])
def test_default_chunks_fit_any_grid(grid):
    for kind in range(3):
        chunk = default_chunk(grid, kind)
        part = vmoba_partition(grid, chunk)
        assert part.size == math.prod(grid)
        assert min(part.lengths) >= 1 and (part.num_chunks == 1 or max(part.lengths) >= 256 or kind == 0)
    assert default_chunk((21, 30, 52), 0) == 3
    assert vmoba_partition((21, 45, 80), default_chunk((21, 45, 80), 2)).num_chunks == 72  # paper: 7x15x20 -> 36


def test_bad_input_errors():
    q = k = torch.randn(1, 1, 48, 8)
    grid = (3, 4, 4)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        vmoba_token_mask(q, k, grid, 1, tau=0.0)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        vmoba_token_mask(q, k, grid, 1, tau=1.5)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        vmoba_token_mask(q, k, grid, 1, select="topk", topk=0)
    with pytest.raises(ValueError, match="larger than the grid"):
        vmoba_token_mask(q, k, grid, (2, 5))
    with pytest.raises(ValueError, match="larger than the grid"):
        vmoba_token_mask(q, k, grid, 4)
    with pytest.raises(ValueError, match="only defined for select='threshold'"):
        vmoba_token_mask(q, k, grid, 1, select="topk", threshold_type="block")
    with pytest.raises(ValueError, match="48 tokens but the grid"):
        vmoba_token_mask(q, k, (3, 4, 5), 1)
    with pytest.raises(OptionError, match="tau"):
        build_config(VMoBAConfig, "vmoba", {"tau": 0.0})
    with pytest.raises(OptionError, match="topk"):
        build_config(VMoBAConfig, "vmoba", {"topk": 0})
    with pytest.raises(ValueError, match="chunk_2d"):
        VMoBAConfig(chunk_2d=(0, 2))


def test_config_defaults_follow_the_paper():
    tf, tr = _cfg(), _cfg(setting="training")
    assert (tf.select, tf.threshold_type, tf.topk_for(24), tf.topk_for(72), tf.topk_for(7)) == \
        ("topk", "query_head", 6, 18, 2)
    assert (tr.select, tr.threshold_type, tr.tau) == ("threshold", "head_global", 0.25)
    assert tf.dense_first_steps == 0.25 and tf.dense_first_layers == 0
    assert [tf.partition_kind(i) for i in range(4)] == [0, 1, 2, 0]
    assert [_cfg(dense_first_layers=1).partition_kind(i) for i in range(1, 4)] == [0, 1, 2]


def test_half_precision_runs_in_fp32_selection():
    torch.manual_seed(6)
    grid = (4, 6, 8)
    q, k, v = (torch.randn(1, 2, 192, 16) for _ in range(3))
    cfg = _cfg(chunk_3d=(2, 3, 4))
    ref = vmoba_visual_attention(q, k, v, None, None, None, config=cfg, layout=TokenLayout(*grid), layer_index=2)
    out = vmoba_visual_attention(q.half(), k.half(), v.half(), None, None, None, config=cfg,
                                 layout=TokenLayout(*grid), layer_index=2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
