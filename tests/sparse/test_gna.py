"""GNA: the mask against a literal statement of NATTEN's definition, the tile fast path, the method."""
from __future__ import annotations

import itertools
import math
import random
import sys

import pytest
import torch

import attnproc
import attnproc.sparse.gna  # noqa: F401  (registers "gna")
from attnproc.kernels import dense_attention, token_to_block_mask
from attnproc.sparse._tiles import auto_tile, tile_permutation
from attnproc.sparse.gna import GNA, gna_mask, gna_plan

from sparse_helpers import SIZES, assert_matches_masked_dense, call_kwargs, capture, output, tiny_pipeline


def literal(grid, k, s, d, c):
    """NATTEN's per-dimension rule, one (query, key) pair at a time, written as NATTEN states it: the window is
    centred on the stride-group leader, the centre clamped so the window stays inside the dilation group."""
    coords = list(itertools.product(*[range(g) for g in grid]))
    n = len(coords)
    m = torch.zeros(n, n, dtype=torch.bool)
    for qi, x in enumerate(coords):
        for ki, y in enumerate(coords):
            ok = True
            for L, K, S, D, C, a, b in zip(grid, k, s, d, c, x, y):
                if a % D != b % D:
                    ok = False
                    break
                lg = len(range(a % D, L, D))
                a, b = a // D, b // D
                if C:
                    lead = min((a // S) * S + S - 1, lg - 1)
                    ok = b <= a and lead - b < K
                else:
                    left, right = K // 2, K // 2 + K % 2 - 1
                    lead = min((a // S) * S + S // 2, lg - 1)
                    centre = min(max(lead, left), lg - 1 - right)
                    ok = centre - left <= b <= centre + right
                if not ok:
                    break
            m[qi, ki] = ok
    return m


def _random_configs(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nd = rng.choice([1, 2, 3])
        grid = tuple(rng.randint(1, 8) for _ in range(nd))
        d = tuple(rng.randint(1, 3) for _ in range(nd))
        if any(dd > g for dd, g in zip(d, grid)):
            continue
        k = tuple(rng.randint(1, g // dd) for g, dd in zip(grid, d))
        s = tuple(rng.randint(1, kk) for kk in k)
        c = tuple(rng.random() < 0.3 for _ in range(nd))
        out.append((grid, k, s, d, c))
    return out


@pytest.mark.parametrize("cfg", _random_configs(40))
def test_mask_matches_literal_definition(cfg):
    grid, k, s, d, c = cfg
    assert torch.equal(gna_mask(grid, k, s, d, c), literal(grid, k, s, d, c))


def test_named_special_cases():
    # s=1: every query sees exactly k keys per dimension (windows shifted inward at the borders)
    m = gna_mask((7, 6), (3, 4))
    assert (m.sum(1) == 12).all()
    # s=k: blocked attention (Swin-like): the mask is block diagonal
    m = gna_mask(8, 4, stride=4)
    assert torch.equal(m, torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool())
    # k=L: full self attention; integers broadcast over every dimension
    assert gna_mask((3, 4), (3, 4)).all() and torch.equal(gna_mask((5, 5), 3), gna_mask((5, 5), (3, 3)))
    # causal: never a future key; stride groups share the leader's window
    m = gna_mask(9, 3, causal=True)
    assert not torch.triu(m, 1).any() and (m.sum(1)[2:] == 3).all()
    # dilation: keys only in the query's dilation group
    m = gna_mask(8, 2, dilation=2)
    assert not m[0, 1] and m[0, 2] and not m[0, 3]


@pytest.mark.parametrize("grid,k,s,d,msg", [
    ((8, 8), (9, 3), 1, 1, "kernel_size \\* dilation"),
    ((8, 8), (3, 3), 1, (3, 1), "kernel_size \\* dilation"),
    (16, 3, 4, 1, "stride cannot be larger"),
    ((4, 4), (0, 3), 1, 1, "positive int"),
    ((4, 4, 4, 4), 3, 1, 1, "1, 2 or 3"),
    ((4, 4), (3, 3, 3), 1, 1, "one entry per grid dimension"),
])
def test_natten_constraints_are_clear_errors(grid, k, s, d, msg):
    with pytest.raises(ValueError, match=msg):
        gna_mask(grid, k, s, d)


# ---- tiles ---------------------------------------------------------------------------------------------------
def test_tile_permutation_roundtrip_and_auto_tile():
    perm, inv = tile_permutation((4, 6, 8), (2, 3, 4))
    x = torch.arange(4 * 6 * 8)
    assert torch.equal(x[perm][inv], x)
    assert perm[:24].tolist() == [a * 48 + b * 8 + c for a in range(2) for b in range(3) for c in range(4)]
    assert auto_tile((8, 32, 32), 128, (2, 8, 8)) == (2, 8, 8)
    with pytest.raises(ValueError, match="does not divide"):
        tile_permutation((4, 6), (3, 3))


@pytest.mark.parametrize("grid,k,s,tile,aligned", [
    ((4, 8, 8), (2, 4, 4), (2, 4, 4), (2, 4, 4), True),      # blocked: stride = tile = window
    ((4, 8, 8), (4, 8, 8), (2, 4, 4), (2, 4, 4), True),      # window = grid
    ((6, 12, 12), (6, 12, 4), (2, 4, 4), (2, 4, 4), True),   # odd multiples of the stride
    ((4, 8, 8), (3, 5, 5), (1, 1, 1), (2, 4, 4), False),     # plain NA: partial tiles
    ((4, 8, 8), (4, 8, 8), (2, 4, 4), (1, 4, 4), True),
])
def test_plan_block_mask_equals_tiled_token_mask(grid, k, s, tile, aligned):
    plan = gna_plan(grid, k, s, tile=tile)
    tok = gna_mask(grid, k, s)
    tiled = tok[plan.perm][:, plan.perm]
    bm, waste = token_to_block_mask(tiled, plan.block_size)
    assert torch.equal(bm, plan.block_mask)
    assert plan.aligned == aligned == (waste == 0.0)
    assert math.isclose(plan.token_density, tok.float().mean().item(), rel_tol=1e-6)
    assert math.isclose(plan.block_density, bm.float().mean().item(), rel_tol=1e-6)


# ---- the method ------------------------------------------------------------------------------------------------
def _site(family, layout, kind="self"):
    return attnproc.Site(family, None, "blocks.1.attn1", 2, 1, kind, layout, None)


@pytest.mark.parametrize("opts", [
    dict(kernel_size=(2, 4, 4), stride=(2, 4, 4), tile=(2, 4, 4)),   # aligned: block-sparse fast path
    dict(kernel_size=(3, 5, 3), stride=1, tile=(2, 4, 4)),           # not aligned: exact dense-masked path
    dict(kernel_size=(1, 3, 3), stride=1, tile=(2, 4, 4), exact=False),  # whole tiles
    dict(kernel_size=(2, 4, 4), dilation=(1, 2, 2)),
])
def test_method_equals_dense_with_token_mask_synthetic(opts):
    layout = attnproc.TokenLayout(4, 8, 8, text_len=12, text_position="before")
    method = GNA(attnproc.registry.REGISTRY.create("gna", **opts).config)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    site = _site("cogvideox", layout, "joint")
    out = method.attention(q, k, v, site)
    tm = method.token_mask(site, layout.seq_len, layout.seq_len)
    assert tm is not None and not tm.all()
    assert torch.allclose(out, dense_attention(q, k, v, attn_mask=tm[None]), atol=1e-5)
    if opts.get("exact", True):
        assert torch.equal(tm[0, 12:, 12:], gna_mask(layout.grid, method.plan_for(site).kernel_size,
                                                    method.plan_for(site).stride, method.plan_for(site).dilation))


@pytest.mark.parametrize("family", ["wan21", "hunyuanvideo", "cogvideox", "ltx", "flux"])
def test_method_on_real_sites_equals_masked_dense(family):
    pipe = tiny_pipeline(family)
    size = SIZES[family][-1 if family == "ltx" else 0]
    opts = dict(kernel_size=(4, 4), stride=(4, 4), tile=(4, 4)) if family == "flux" else \
        dict(kernel_size=(1, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4))
    handle = attnproc.apply(pipe, "gna", dense_first_steps=0, **opts)
    calls = capture(handle, limit=4)
    pipe(**call_kwargs(family, size))
    assert_matches_masked_dense(handle.method, calls)
    plan = next(iter(handle.method._plans.values()))
    assert plan.aligned and plan.block_density < 1
    attnproc.remove(pipe)


@pytest.mark.parametrize("family", ["wan21", "hunyuanvideo", "cogvideox", "ltx", "flux"])
def test_apply_with_family_defaults_at_several_sizes(family):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, "gna", dense_first_steps=0, block_target=32)
    grids = []
    for size in SIZES[family]:
        out = output(pipe(**call_kwargs(family, size)))
        assert torch.isfinite(out).all()
        grids.append(next(iter(handle.last_layouts().values())).grid)
    assert len(handle.method._plans) == len(set(grids))
    assert all(p.aligned for p in handle.method._plans.values())  # defaults hit the exact block-sparse path
    if family != "flux":
        assert any(math.prod(g) % 128 for g in grids)
    attnproc.remove(pipe)


def test_impossible_window_and_bad_options():
    layout = attnproc.TokenLayout(3, 8, 8)
    q = k = v = torch.randn(1, 1, 192, 8)
    method = GNA(attnproc.registry.REGISTRY.create("gna", kernel_size=(5, 3, 3), dense_first_steps=0).config)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        method.attention(q, k, v, _site("wan", layout))
    method = GNA(attnproc.registry.REGISTRY.create("gna", tile=(2, 4, 4), dense_first_steps=0).config)
    with pytest.raises(ValueError, match="does not divide"):
        method.attention(q, k, v, _site("wan", layout))
    for bad in (dict(kernel_size=0), dict(stride=(1, -2, 1)), dict(causal="yes"), dict(kernel_size=2.5)):
        with pytest.raises(attnproc.OptionError):
            attnproc.registry.REGISTRY.create("gna", **bad)
    with pytest.raises(ValueError, match="supported families"):
        attnproc.apply(tiny_pipeline("sd3"), "gna")


def test_natten_backend_agrees_if_installed():
    natten = pytest.importorskip("natten")
    grid, k, s = (4, 8, 8), (3, 4, 4), (1, 2, 2)
    q, kk, v = (torch.randn(1, 4, 8, 8, 2, 16) for _ in range(3))  # NATTEN: [B, T, H, W, heads, D]
    ref = natten.na3d(q, kk, v, kernel_size=k, stride=s, backend="flex-fna")
    flat = [t.reshape(1, 256, 2, 16).transpose(1, 2) for t in (q, kk, v)]
    ours = dense_attention(*flat, attn_mask=gna_mask(grid, k, s))
    assert torch.allclose(ours.transpose(1, 2).reshape(ref.shape), ref, atol=1e-4)


def test_natten_backend_without_natten_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)  # as if not installed (find_spec then answers None)
    with pytest.raises(attnproc.OptionError, match="backend='natten' needs the natten package"):
        attnproc.registry.REGISTRY.create("gna", backend="natten")


@pytest.mark.parametrize("grid, text", [((4, 8, 8), 0), ((4, 8, 8), 5), ((1, 8, 16), 3)])
def test_natten_backend_equals_our_kernels_if_installed(grid, text):
    pytest.importorskip("natten")
    layout = attnproc.TokenLayout(*grid, text_len=text, text_position="after" if text else "none")
    kind = "joint" if text else "self"
    site = attnproc.Site("wan" if grid[0] > 1 else "flux", "transformer", "blocks.3.attn1", 6, 3, kind, layout, None)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
    ours = attnproc.registry.REGISTRY.create("gna", dense_first_steps=0, backend="gather")
    theirs = attnproc.registry.REGISTRY.create("gna", dense_first_steps=0, backend="natten")
    torch.testing.assert_close(theirs.attention(q, k, v, site), ours.attention(q, k, v, site), atol=1e-4, rtol=1e-4)
