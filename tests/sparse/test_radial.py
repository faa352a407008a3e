"""Radial Attention: the mask against a slow re-statement of the reference, the method on every video family."""
from __future__ import annotations

import math

import pytest
import torch

import attnproc
import attnproc.sparse.radial  # noqa: F401  (registers "radial")
from attnproc.kernels import dense_attention
from attnproc.sparse.radial import RADIAL_DEFAULTS, Radial, radial_block_mask

from sparse_helpers import SIZES, assert_matches_masked_dense, call_kwargs, capture, output, tiny_pipeline


# ---- a slow, literal statement of gen_log_mask_shrinked (token masks per frame pair, canvas, shrink, OR) -------
def slow_reference(F, S, B, decay, sink, text=0, corrected=False):
    N = F * S
    nb = math.ceil((N + text) / B)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    r = torch.arange(S)[:, None]
    c = torch.arange(S)[None, :]
    P = 2 ** S.bit_length()
    if corrected:
        tok = torch.zeros(N, N, dtype=torch.bool)
    for i in range(F):
        for j in range(F):
            d = abs(i - j)
            if sink and j == 0:
                pair = torch.ones(S, S, dtype=torch.bool)
            else:
                w = S if d <= 1 else max(B, P / 2 ** d.bit_length() * decay)
                u = P / 2 ** d.bit_length()
                thr = B if corrected else 128
                keep = (corrected and d <= 1) or u >= thr or d % int(thr / u) == 0
                pair = ((c - r).abs() <= w) & keep
            if corrected:
                tok[i * S:(i + 1) * S, j * S:(j + 1) * S] = pair
                continue
            rr, rc = (i * S) % B, (j * S) % B
            nbs = math.ceil(S / B)
            canvas = torch.zeros(rr + nbs * B, rc + nbs * B, dtype=torch.bool)
            canvas[rr:rr + S, rc:rc + S] = pair
            canvas = canvas[:nbs * B, :nbs * B]
            blk = torch.zeros(nbs, nbs, dtype=torch.bool)
            for a in range(nbs):
                for b in range(nbs):
                    tile = canvas[a * B:(a + 1) * B, b * B:(b + 1) * B].float()
                    dens = tile.sum(0) / B
                    blk[a, b] = (dens > 1 / 3).sum() / ((dens > 0).sum() + 1e-9) > 0.6
            r0, c0 = (i * S) // B, (j * S) // B
            out[r0:r0 + nbs, c0:c0 + nbs] |= blk[:nb - r0, :nb - c0]
    if corrected:
        nbv = math.ceil(N / B)
        for a in range(nbv):
            rows = tok[a * B:(a + 1) * B]
            for b in range(nbv):
                tile = rows[:, b * B:(b + 1) * B].float()
                dens = tile.sum(0) / tile.shape[0]
                out[a, b] = (dens > 1 / 3).sum() / ((dens > 0).sum() + 1e-9) > 0.6
        border = N // B if text else nb
    else:
        border = N // B
    out[border:] = True
    out[:, border:] = True
    return out


GEOMS = [  # frames, tokens/frame, block, decay, sink, text
    (3, 64, 128, 1.0, True, 0), (5, 80, 128, 1.0, False, 17), (9, 100, 64, 0.5, False, 0),
    (6, 300, 128, 0.3, True, 40), (7, 130, 128, 1.0, True, 0), (12, 256, 128, 0.2, True, 0),
    (4, 64, 16, 1.0, True, 5), (17, 48, 128, 0.95, False, 0), (10, 200, 128, 2.0, False, 0),
]


@pytest.mark.parametrize("F,S,B,decay,sink,text", GEOMS)
def test_reference_mask_matches_literal_definition(F, S, B, decay, sink, text):
    got = radial_block_mask(F, S, block_size=B, decay=decay, sink=sink, text_tokens=text)
    assert got.dtype == torch.bool and got.shape == (math.ceil((F * S + text) / B),) * 2
    assert torch.equal(got, slow_reference(F, S, B, decay, sink, text))


@pytest.mark.parametrize("F,S,B,decay,sink,text", GEOMS[:6])
def test_corrected_mask_matches_literal_definition(F, S, B, decay, sink, text):
    got = radial_block_mask(F, S, block_size=B, decay=decay, sink=sink, text_tokens=text, variant="corrected")
    assert torch.equal(got, slow_reference(F, S, B, decay, sink, text, corrected=True))


def test_real_wan_geometries_match_reference_densities():
    # densities printed by the reference gen_log_mask_shrinked at HEAD 72788d4 (benchmarks/results/
    # sparse-radial-parity.json holds the full element-wise comparison)
    m = radial_block_mask(21, 1560, decay=1.0, sink=True)  # 480x832, 81 frames
    assert round(m[:255, :255].float().mean().item(), 4) == 0.4449
    m = radial_block_mask(18, 3840, decay=0.2, sink=True)  # 768x1280, 69 frames
    assert m.shape == (540, 540) and round(m.float().mean().item(), 4) == 0.2871


def test_reference_defects_and_their_correction():
    # fewer than 128 tokens per frame: the reference decimates adjacent frames away, the corrected one keeps them
    ref = radial_block_mask(8, 32, block_size=32, decay=1.0, sink=False)
    fix = radial_block_mask(8, 32, block_size=32, decay=1.0, sink=False, variant="corrected")
    assert not ref[3, 2] and not ref[3, 4] and fix[3, 2] and fix[3, 4]
    assert ref.float().mean() < fix.float().mean()
    # partial last block: the reference forces it dense, the corrected variant evaluates it
    ref = radial_block_mask(16, 100, decay=0.2, sink=False)
    fix = radial_block_mask(16, 100, decay=0.2, sink=False, variant="corrected")
    assert ref[-1].all() and not fix[-1].all()


@pytest.mark.parametrize("bad", [dict(decay=0.0), dict(decay=-1.0), dict(decay=float("nan")), dict(block_size=0),
                                 dict(variant="paper")])
def test_mask_bad_input(bad):
    with pytest.raises(ValueError):
        radial_block_mask(4, 64, **bad)
    with pytest.raises(ValueError):
        radial_block_mask(0, 64)


def test_bad_options_are_refused_before_touching_the_pipeline():
    pipe = tiny_pipeline("wan21")
    before = {n: id(m.processor) for n, m in attnproc.families.attention_modules(pipe.transformer)}
    for bad in (dict(decay=0.0), dict(decay=-0.5), dict(variant="x"), dict(block_size=3)):
        with pytest.raises(attnproc.OptionError):
            attnproc.apply(pipe, "radial", **bad)
    assert before == {n: id(m.processor) for n, m in attnproc.families.attention_modules(pipe.transformer)}


def test_unsupported_family_is_refused_at_apply():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match="supported families: wan"):
        attnproc.apply(pipe, "radial")
    assert not any(type(m.processor).__module__.startswith("attnproc")
                   for _, m in attnproc.families.attention_modules(pipe.unet))


def test_family_defaults_resolve_and_scale_with_steps():
    cfg = attnproc.registry.REGISTRY.create("radial").config
    wan = Radial.resolve(cfg, "wan")
    assert (wan.decay, wan.sink, wan.dense_first_layers) == (0.2, True, 1)
    assert round(wan.dense_first_steps * 50) == 12 and round(wan.dense_first_steps * 20) == 5
    hy = Radial.resolve(cfg, "hunyuanvideo")
    assert (hy.decay, hy.sink, hy.dense_first_layers) == (0.95, False, 0)
    assert Radial.resolve(cfg, "wan", "wan22").decay == 0.8
    assert Radial.resolve(cfg, "wan").__class__ is cfg.__class__ and cfg.decay is None  # the config itself is untouched
    assert set(RADIAL_DEFAULTS) >= {"wan", "hunyuanvideo", "cogvideox", "ltx"}


# ---- the method on the tiny pipelines -----------------------------------------------------------------------
FAMS = ["wan21", "hunyuanvideo", "cogvideox", "ltx"]


@pytest.mark.parametrize("family", FAMS)
def test_method_equals_dense_with_its_token_mask(family):
    pipe = tiny_pipeline(family)
    for variant in ("reference", "corrected"):
        handle = attnproc.apply(pipe, "radial", dense_first_steps=0, dense_first_layers=0, block_size=16,
                                decay=0.5, variant=variant)
        calls = capture(handle)
        pipe(**call_kwargs(family, SIZES[family][-1 if family == "ltx" else 0]))  # ltx: >= 3 latent frames
        method = handle.method
        assert_matches_masked_dense(method, calls)
        # the mask really is sparse here, so the check has teeth
        q, k, v, site, *_ = calls[0]
        tm = method.token_mask(site, q.shape[2], k.shape[2])
        assert tm is not None and not tm.all()
        attnproc.remove(pipe)


@pytest.mark.parametrize("text_position", ["after", "before"])
def test_joint_text_padding_is_honoured_without_nan(text_position):
    # HunyuanVideo-style [B, 1, 1, S] key padding with a different valid text length per batch element
    layout = attnproc.TokenLayout(4, 8, 8, text_len=24, text_position=text_position)
    method = Radial(attnproc.registry.REGISTRY.create("radial", block_size=16, decay=0.5).config)
    site = attnproc.Site("hunyuanvideo", None, "transformer_blocks.0.attn", 0, 0, "joint", layout, None)
    S = layout.seq_len
    q, k, v = (torch.randn(2, 3, S, 16) for _ in range(3))
    valid = torch.ones(2, S, dtype=torch.bool)
    ts = layout.text_slice
    valid[0, ts.start + 10:ts.stop] = False
    valid[1, ts.start + 3:ts.stop] = False
    mask = valid[:, None, None, :]
    out = method.attention(q, k, v, site, attn_mask=mask)
    assert torch.isfinite(out).all()
    tm = method.token_mask(site, S, S)[None]
    ref = dense_attention(q, k, v, attn_mask=mask & tm)
    assert torch.allclose(out, ref, atol=1e-5)
    # a mask that is not key padding falls back to dense, still exact and finite
    odd = torch.rand(2, 1, S, S) > 0.3
    odd[..., 0] = True
    out = method.attention(q, k, v, site, attn_mask=odd)
    assert torch.allclose(out, dense_attention(q, k, v, attn_mask=odd), atol=1e-5)


@pytest.mark.parametrize("family", ["wan21", "wan22", "hunyuanvideo", "cogvideox", "ltx"])
def test_apply_at_several_sizes(family):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, "radial", dense_first_steps=0, dense_first_layers=0, block_size=32)
    grids = []
    for size in SIZES[family]:
        out = output(pipe(**call_kwargs(family, size)))
        assert torch.isfinite(out).all()
        grids.append(next(iter(handle.last_layouts().values())).grid)
    assert any(math.prod(g) % 128 for g in grids)
    # one cached mask per shape: a new shape never reuses a stale mask
    shapes = {(k[0], k[1]) for k in handle.method._masks}
    assert shapes == {(g[0], g[1] * g[2]) for g in grids}
    attnproc.remove(pipe)


def test_schedule_dense_steps_and_layers_are_dense():
    pipe = tiny_pipeline("wan21")
    handle = attnproc.apply(pipe, "radial", dense_first_steps=1, dense_first_layers=1, block_size=16, decay=0.5)
    seen = []
    method = handle.method
    inner = method.attention

    def attention(q, k, v, site, *, attn_mask=None, scale=None):
        out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if site.kind == "self":
            dense = dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            seen.append((site.step.index, site.layer, torch.allclose(out, dense, atol=1e-5),
                         method.token_mask(site, q.shape[2], k.shape[2]) is None))
        return out

    method.attention = attention
    pipe(**call_kwargs("wan21", SIZES["wan21"][0]))
    for step, layer, equal, none in seen:
        sparse_expected = step >= 1 and layer >= 1
        assert none == (not sparse_expected)
        if not sparse_expected:
            assert equal
    assert any(not e for s, l, e, _ in seen if s >= 1 and l >= 1)  # the sparse calls really differ from dense
    attnproc.remove(pipe)


def test_direct_processor_without_hooks_uses_layout_and_no_step():
    layout = attnproc.TokenLayout(4, 8, 8)
    method = Radial(attnproc.registry.REGISTRY.create("radial", block_size=16).config)
    site = attnproc.Site("wan", None, "blocks.3.attn1", 6, 3, "self", layout, None)
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    out = method.attention(q, k, v, site)
    ref = dense_attention(q, k, v, attn_mask=method.token_mask(site, 256, 256)[None])
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="supported families"):
        method.attention(q, k, v, attnproc.Site("flux", None, "x", 0, 0, "joint", layout, None))
