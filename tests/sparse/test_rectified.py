"""Rectified SpaAttn: mask and output against a loop-by-loop reading of the reference, the Gilbert layout, fp16
safety and bad input."""
from __future__ import annotations

import hashlib
import itertools
import math

import pytest
import torch

from attnproc.layout import TokenLayout
from attnproc.options import OptionError, build_config
from attnproc.sparse.gilbert import gilbert_block_neighbors, gilbert_order, gilbert_permutation
from attnproc.sparse.rectified import RectifiedConfig, rectified_attention, rectified_visual_attention


# ---- the reference's computation, one query block at a time ------------------------------------------------
def literal(q, k, v, bs, drop, pr, ff, nbr, text_len=0, text_valid=None, hunyuan=False):
    B, H, S, D = q.shape
    N = S - text_len
    te = text_len if text_valid is None else text_valid
    nq = math.ceil(N / bs)
    top_k = int((1 - drop) * nq)
    q, k, v = q.double(), k.double(), v.double()
    pad = nq * bs - N
    qv, kv, vv = (torch.cat([x[:, :, :N], x.new_zeros(B, H, pad, x.shape[-1])], 2) for x in (q, k, v))
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    crit_all = torch.zeros(B, H, nq, nq, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(nq)):
        qi = qv[b, h, i * bs:(i + 1) * bs]
        qbar = qi.mean(0)
        kbars = [kv[b, h, j * bs:(j + 1) * bs].mean(0) for j in range(nq)]
        vbars = [vv[b, h, j * bs:(j + 1) * bs].mean(0) for j in range(nq)]
        logits = torch.stack([qbar @ kb for kb in kbars]) / math.sqrt(D)
        txt = k[b, h, N:N + te]
        if hunyuan:
            p = torch.softmax(torch.cat([logits, txt @ qbar / math.sqrt(D)]), 0)
            pv, pt = p[:nq], p[nq:].sum()
            den = pv.sum() * bs + pt
            P = torch.cat([pv * bs / den, (pt / den)[None]])
        else:
            P = torch.softmax(logits, 0)
        order = sorted(range(len(P)), key=lambda j: (-float(P[j]), j))
        run, count = 0.0, 0
        for j in order:
            run += float(P[j])
            count += run <= pr
        count = max(count + 1, top_k)
        crit = set(order[:count])
        crit |= {j for j in range(nq) if nbr is not None and nbr[i, j]}
        if i < ff:
            crit |= set(range(ff))
        crit.discard(nq)
        for j in crit:
            crit_all[b, h, i, j] = True
        dq = (qi - qbar).abs().mean(0)
        R, approx = (float(P[nq]) if hunyuan else 0.0), torch.zeros(v.shape[-1], dtype=torch.float64)
        for j in range(nq):
            kj = kv[b, h, j * bs:(j + 1) * bs]
            gain = abs(float(qbar @ kbars[j]))
            err = abs(float(dq @ kbars[j])) + abs(float(qbar @ (kj - kbars[j]).abs().mean(0)))
            if j in crit or not gain > err:
                R += float(P[j])
            else:
                approx += P[j] * vbars[j]
        keys = [t for j in sorted(crit) for t in range(j * bs, min((j + 1) * bs, N))]
        kk = torch.cat([k[b, h, keys], txt if hunyuan else txt[:0]])
        vvv = torch.cat([v[b, h, keys], v[b, h, N:N + te] if hunyuan else v[b, h, :0]])
        for t in range(i * bs, min((i + 1) * bs, N)):
            w = torch.softmax(kk @ q[b, h, t] / math.sqrt(D), 0)
            out[b, h, t] = R * (w @ vvv) + approx
    return out, crit_all


CASES = [  # S, block, drop, p_remain, first_frame_blocks
    (192, 32, 0.75, 0.3, 2), (200, 32, 0.5, 0.5, 0), (150, 16, 0.8, 0.3, 3), (256, 64, 0.0, 0.9, 0),
]


@pytest.mark.parametrize("S,bs,drop,pr,ff", CASES)
def test_wan_matches_literal_reference(S, bs, drop, pr, ff):
    torch.manual_seed(S + bs)
    q, k, v = (torch.randn(1, 2, S, 16) * 1.5 for _ in range(3))
    nq = math.ceil(S / bs)
    nbr = torch.rand(nq, nq) < 0.15
    out, mask = rectified_attention(q, k, v, block_size=bs, drop_rate=drop, p_remain=pr, first_frame_blocks=ff,
                                    neighbors=nbr, return_block_mask=True)
    want, crit = literal(q, k, v, bs, drop, pr, ff, nbr)
    assert torch.equal(mask, crit)
    assert mask.any(-1).all()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    assert 0 < crit.float().mean() < 1 or drop == 0.0


@pytest.mark.parametrize("N,bs,T,Tv", [(192, 32, 48, 30), (200, 32, 40, 40), (128, 32, 32, 0), (160, 64, 64, 1)])
def test_hunyuan_matches_literal_reference(N, bs, T, Tv):
    torch.manual_seed(N + Tv)
    S = N + T
    q, k, v = (torch.randn(1, 2, S, 16) * 1.5 for _ in range(3))
    nq = math.ceil(N / bs)
    nbr = torch.rand(nq, nq) < 0.15
    out, mask = rectified_attention(q, k, v, block_size=bs, drop_rate=0.75, p_remain=0.3, neighbors=nbr,
                                    text_len=T, text_valid=Tv, variant="hunyuan", return_block_mask=True)
    want, crit = literal(q, k, v, bs, 0.75, 0.3, 0, nbr, text_len=T, text_valid=Tv, hunyuan=True)
    nt = math.ceil(T / bs)
    assert mask.shape == (1, 2, nq, nq + nt)
    assert torch.equal(mask[..., :nq], crit)
    assert mask[..., nq:nq + math.ceil(Tv / bs)].all()
    torch.testing.assert_close(out[:, :, :N].double(), want, atol=2e-5, rtol=1e-4)
    # text queries: dense over the visual and the valid text keys
    keys, vals = torch.cat([k[:, :, :N], k[:, :, N:N + Tv]], 2), torch.cat([v[:, :, :N], v[:, :, N:N + Tv]], 2)
    ref_t = torch.softmax(q[:, :, N:] @ keys.transpose(-1, -2) / 4.0, -1) @ vals
    torch.testing.assert_close(out[:, :, N:], ref_t, atol=2e-5, rtol=1e-4)


def test_fp16_large_activations_stay_finite():
    """The reference's B_s^2 factor overflows fp16 for activations of this size; ours has no such factor."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 512, 64) * 40 for _ in range(3))
    q16, k16, v16 = q.half(), k.half(), v.half()
    out, mask = rectified_attention(q16, k16, v16, block_size=128, drop_rate=0.5, p_remain=0.3,
                                    return_block_mask=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (q16.float()[0, 0, :128].mean(0) @ k16.float()[0, 0, :128].mean(0) * 128 * 128).abs() > 65504
    ref, ref_mask = rectified_attention(q16.float(), k16.float(), v16.float(), block_size=128, drop_rate=0.5,
                                        p_remain=0.3, return_block_mask=True)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---- Gilbert layout ----------------------------------------------------------------------------------------
def test_gilbert_order_matches_the_reference_curve():
    # curve orders printed by the reference's gilbert_mapping (utils/jenga_gilbert.py at 4b0aa10, axis order w,h,t)
    assert gilbert_order((2, 3, 4)).tolist() == [0, 12, 13, 1, 5, 17, 16, 4, 8, 20, 21, 9, 10, 22, 23, 11, 7, 19,
                                                 18, 6, 2, 14, 15, 3]
    digest = hashlib.sha256(str(gilbert_order((8, 12, 33)).tolist()).encode()).hexdigest()
    assert digest == "9ae4b5138ed355c0f2bba44bdb8482c4279b5117bccfbb830bbc58edc00304f4"


@pytest.mark.parametrize("grid", [(2, 4, 6), (3, 5, 7), (1, 9, 13), (5, 1, 1), (4, 6, 10)])
def test_gilbert_is_a_compact_walk(grid):
    T, H, W = grid
    perm, inv = gilbert_permutation(grid)
    assert sorted(perm.tolist()) == list(range(T * H * W))
    assert torch.equal(perm[inv], torch.arange(T * H * W))
    coords = torch.stack([perm // (H * W), (perm // W) % H, perm % W], 1)
    steps = (coords[1:] - coords[:-1]).abs()
    assert (steps.max(1).values <= 1).all()  # every step goes to a (possibly diagonal) grid neighbour
    if all(s % 2 == 0 for s in grid if s > 1):
        assert (steps.sum(1) == 1).all()  # even sides: face neighbours only


@pytest.mark.parametrize("grid,bs", [((2, 4, 6), 8), ((3, 5, 7), 16), ((4, 6, 10), 32)])
def test_block_neighbors_literal(grid, bs):
    T, H, W = grid
    _, inv = gilbert_permutation(grid)
    nb = math.ceil(T * H * W / bs)
    want = torch.zeros(nb, nb, dtype=torch.bool)
    for t, h, w in itertools.product(range(T), range(H), range(W)):
        a = int(inv[(t * H + h) * W + w]) // bs
        for dt, dh, dw in itertools.product((-1, 0, 1), repeat=3):
            if 0 <= t + dt < T and 0 <= h + dh < H and 0 <= w + dw < W:
                want[a, int(inv[((t + dt) * H + h + dh) * W + w + dw]) // bs] = True
    assert torch.equal(gilbert_block_neighbors(grid, bs), want)


@pytest.mark.parametrize("grid", [(3, 6, 10), (5, 7, 9)])
def test_visual_attention_is_the_public_function_in_gilbert_order(grid):
    torch.manual_seed(4)
    N = math.prod(grid)
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    cfg = RectifiedConfig(block_size=16).resolved("wan")
    out = rectified_visual_attention(q, k, v, None, None, None, config=cfg, layout=TokenLayout(*grid))
    perm, inv = gilbert_permutation(grid)
    nq = math.ceil(N / 16)
    ref, blocks = rectified_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], block_size=16, drop_rate=0.75,
                                      p_remain=0.3, first_frame_blocks=nq // grid[0],
                                      neighbors=gilbert_block_neighbors(grid, 16), return_block_mask=True)
    ref = ref[:, :, inv]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # the reported density: critical (query, key) token pairs of the public function's mask, last block ragged
    again, density = rectified_visual_attention(q, k, v, None, None, None, config=cfg, layout=TokenLayout(*grid),
                                                return_density=True)
    sizes = torch.tensor([16] * (nq - 1) + [N - 16 * (nq - 1)], dtype=torch.float64)
    pairs = blocks.repeat_interleave(sizes.long(), dim=-2).repeat_interleave(sizes.long(), dim=-1)
    assert torch.equal(again, out) and density == pytest.approx(float(pairs.double().mean()), abs=1e-12)
    assert 0 < density < 1


def test_bad_input_errors():
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
        rectified_attention(q, q, q, block_size=16, drop_rate=1.0, p_remain=0.3)
    with pytest.raises(ValueError, match=r"p_remain must be in \(0, 1\]"):
        rectified_attention(q, q, q, block_size=16, drop_rate=0.5, p_remain=0.0)
    with pytest.raises(ValueError, match="variant='wan' has no joint text"):
        rectified_attention(q, q, q, block_size=16, drop_rate=0.5, p_remain=0.3, text_len=8)
    with pytest.raises(ValueError, match="text_valid"):
        rectified_attention(q, q, q, block_size=16, drop_rate=0.5, p_remain=0.3, text_len=8, text_valid=9,
                            variant="hunyuan")
    with pytest.raises(ValueError, match="neighbors"):
        rectified_attention(q, q, q, block_size=16, drop_rate=0.5, p_remain=0.3, neighbors=torch.ones(2, 2).bool())
    with pytest.raises(OptionError, match="drop_rate"):
        build_config(RectifiedConfig, "rectified", {"drop_rate": 1.0})
    with pytest.raises(ValueError, match="drop_rate"):
        RectifiedConfig(drop_rate=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_sparsity_keeps_a_block_per_row_and_stays_finite(dtype):
    """drop_rate 0.999 (top_k = 0), a vanishing p_remain, no neighbours or first-frame square: the threshold still
    keeps each query block's most probable key block, so no row is empty and the output has no NaN."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 70, 16).mul(4).to(dtype) for _ in range(3))  # 5 blocks of 16, the last ragged
    out, mask = rectified_attention(q, k, v, block_size=16, drop_rate=0.999, p_remain=1e-6, return_block_mask=True)
    assert mask.shape == (2, 3, 5, 5) and torch.equal(mask.sum(-1), torch.ones(2, 3, 5, dtype=torch.long))
    assert out.dtype == dtype and torch.isfinite(out).all()
