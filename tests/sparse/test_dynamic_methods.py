"""VMoBA and Rectified SpaAttn as registered methods: every video family's tiny pipeline against an oracle built
from the public reference-parity functions, the schedule, exact removal, refused families and options."""
from __future__ import annotations

import math

import pytest
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.sparse.base import key_padding
from attnproc.sparse.gilbert import gilbert_block_neighbors, gilbert_permutation
from attnproc.sparse.rectified import rectified_attention
from attnproc.sparse.vmoba import vmoba_partition, vmoba_token_mask

from sparse_helpers import SIZES, call_kwargs, capture, output, tiny_pipeline

VIDEO = ["wan21", "wan22", "hunyuanvideo", "cogvideox", "ltx"]
# small explicit chunks / blocks so the tiny grids (60-480 tokens) are cut into several, some ragged
OPTIONS = {
    "vmoba": dict(dense_first_steps=0, chunk_1d=1, chunk_2d=(3, 5), chunk_3d=(2, 3, 5), topk=2),
    "rectified": dict(dense_first_steps=0, dense_first_layers=0, block_size=20),
}


def _stock_processors(pipe):
    return {f"{d}.{n}": id(m.processor) for d in ("transformer", "transformer_2") if getattr(pipe, d, None) is not None
            for n, m in attnproc.families.attention_modules(getattr(pipe, d))}


def _vmoba_mask(method, qv, kv, site, valid_text):
    """bool [B, H, N, N + T]: vmoba_token_mask over the visual keys, then the valid text keys."""
    cfg, layout = method.config_for(site), site.layout
    chunk = cfg.chunk_for(layout.grid, site.layer)
    C = vmoba_partition(layout.grid, chunk).num_chunks
    m = vmoba_token_mask(qv, kv, layout.grid, chunk, select=cfg.select, threshold_type=cfg.threshold_type,
                         tau=cfg.tau, topk=cfg.topk_for(C))
    return torch.cat([m, valid_text[:, None, None, :].expand(*m.shape[:3], -1)], dim=-1)


def oracle(method, q, k, v, site, attn_mask, scale):
    """The call's output computed from the public functions: text queries dense, visual queries by
    ``vmoba_token_mask`` + dense, or ``rectified_attention`` in Gilbert order (IPAR variant with joint text)."""
    layout, B = site.layout, q.shape[0]
    ref = dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    vis = layout.visual_slice
    joint = site.kind == "joint" and layout.text_len and layout.text_position in ("before", "after")
    txt = layout.text_slice if joint else slice(0, 0)
    valid = key_padding(attn_mask, B, k.shape[2])
    assert valid is not False, "the tiny pipelines only use key-padding masks"
    qv, kv, vv = q[:, :, vis], k[:, :, vis], v[:, :, vis]
    kt, vt = k[:, :, txt], v[:, :, txt]
    vt_valid = valid[:, txt] if valid is not None else torch.ones(B, kt.shape[2], dtype=torch.bool)
    cfg = method.config_for(site)
    if method.name == "vmoba":
        m = _vmoba_mask(method, qv, kv, site, vt_valid)
        ref[:, :, vis] = dense_attention(qv, torch.cat([kv, kt], 2), torch.cat([vv, vt], 2), attn_mask=m, scale=scale)
        return ref
    assert scale is None or math.isclose(scale, q.shape[-1] ** -0.5)
    grid, bs = layout.grid, cfg.block_size
    perm, inv = gilbert_permutation(grid)
    nq = math.ceil(layout.visual_len / bs)
    for b in range(B):
        n = int(vt_valid[b].sum())
        seq = [t[b:b + 1, :, perm] for t in (qv, kv, vv)]
        if joint:  # text after the visual tokens, as the reference's HunyuanVideo attention receives it
            seq = [torch.cat([s, t[b:b + 1]], 2) for s, t in zip(seq, (q[:, :, txt], kt, vt))]
        out = rectified_attention(*seq, block_size=bs, drop_rate=cfg.drop_rate, p_remain=cfg.p_remain,
                                  first_frame_blocks=nq // grid[0] if cfg.first_frame else 0,
                                  neighbors=gilbert_block_neighbors(grid, bs) if cfg.neighbors else None,
                                  text_len=kt.shape[2] if joint else 0, text_valid=n if joint else None,
                                  variant="hunyuan" if joint else "wan")
        ref[b:b + 1, :, vis] = out[:, :, :layout.visual_len][:, :, inv]
    return ref


@pytest.mark.parametrize("family,name", [(f, n) for n in ("vmoba", "rectified") for f in VIDEO] + [("flux", "rectified")])
def test_apply_matches_the_oracle_at_two_sizes(family, name):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, name, **OPTIONS[name])
    calls = capture(handle, limit=64)
    grids = []
    for size in SIZES[family]:
        out = output(pipe(**call_kwargs(family, size)))
        assert torch.isfinite(out).all()
        grids.append(next(iter(handle.last_layouts().values())).grid)
    # token counts the blocks / chunks do not divide
    assert any(math.prod(g) % 20 for g in grids) or name == "vmoba"
    assert name == "rectified" or any(g[1] % 3 or g[2] % 5 for g in grids)
    kinds = {(c[3].kind, bool(c[3].layout.text_len)) for c in calls}
    assert kinds == ({("joint", True)} if family in ("hunyuanvideo", "cogvideox", "flux") else {("self", False)})
    differs = False
    for q, k, v, site, attn_mask, scale, got in calls:
        assert torch.isfinite(got).all()
        ref = oracle(handle.method, q, k, v, site, attn_mask, scale)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        differs |= not torch.allclose(got, dense_attention(q, k, v, attn_mask=attn_mask, scale=scale), atol=1e-4)
    assert differs, "the sparse calls equal dense attention: the check has no teeth"
    assert handle.method.token_mask(calls[0][3], 8, 8) is None  # query-dependent: no static mask
    attnproc.remove(pipe)


@pytest.mark.parametrize("name", ["vmoba", "rectified"])
def test_schedule_dense_steps_and_layers_are_dense(name):
    pipe = tiny_pipeline("wan21")
    handle = attnproc.apply(pipe, name, **{**OPTIONS[name], "dense_first_steps": 1, "dense_first_layers": 1})
    method, inner, seen = handle.method, handle.method.attention, []

    def attention(q, k, v, site, *, attn_mask=None, scale=None):
        out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if site.kind == "self":
            seen.append((site.step.index, site.layer,
                         torch.equal(out, dense_attention(q, k, v, attn_mask=attn_mask, scale=scale))))
        return out

    method.attention = attention
    pipe(**call_kwargs("wan21", SIZES["wan21"][0]))
    assert {(s, l) for s, l, _ in seen} >= {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(equal for s, l, equal in seen if s < 1 or l < 1)
    assert not any(equal for s, l, equal in seen if s >= 1 and l >= 1)
    attnproc.remove(pipe)


@pytest.mark.parametrize("name", ["vmoba", "rectified"])
@pytest.mark.parametrize("family", ["wan21", "hunyuanvideo"])
def test_remove_is_exact(family, name):
    pipe = tiny_pipeline(family)
    kw = call_kwargs(family, SIZES[family][0])
    stock_procs, stock = _stock_processors(pipe), output(pipe(**kw))
    attnproc.apply(pipe, name, **OPTIONS[name])
    assert not torch.equal(output(pipe(**call_kwargs(family, SIZES[family][0]))), stock)
    assert attnproc.remove(pipe) is True
    assert _stock_processors(pipe) == stock_procs
    assert torch.equal(output(pipe(**call_kwargs(family, SIZES[family][0]))), stock)


@pytest.mark.parametrize("name", ["vmoba", "rectified"])
def test_unsupported_family_is_refused_at_apply(name):
    pipe = tiny_pipeline("sd15")
    with pytest.raises(attnproc.UnsupportedFamilyError, match="supported families"):
        attnproc.apply(pipe, name)
    assert not any(type(m.processor).__module__.startswith("attnproc")
                   for _, m in attnproc.families.attention_modules(pipe.unet))


@pytest.mark.parametrize("name,bad,field", [
    ("vmoba", dict(tau=0.0), "tau"), ("vmoba", dict(tau=1.5), "tau"), ("vmoba", dict(topk=0), "topk"),
    ("vmoba", dict(select="best"), "select"), ("vmoba", dict(chunk_2d=(0, 2)), "chunk_2d"),
    ("vmoba", dict(select="topk", threshold_type="block"), "threshold_type"),
    ("rectified", dict(drop_rate=1.0), "drop_rate"), ("rectified", dict(p_remain=0.0), "p_remain"),
    ("rectified", dict(block_size=3), "block_size"), ("rectified", dict(reorder="hilbert"), "reorder"),
])
def test_bad_options_are_refused_before_touching_the_pipeline(name, bad, field):
    pipe = tiny_pipeline("wan21")
    before = _stock_processors(pipe)
    with pytest.raises(attnproc.OptionError, match=field):
        attnproc.apply(pipe, name, **bad)
    assert _stock_processors(pipe) == before


def test_registered_with_family_defaults():
    vm = attnproc.registry.REGISTRY.create("vmoba")
    cfg = type(vm).resolve(vm.config, "wan")
    assert (cfg.select, cfg.threshold_type, cfg.dense_first_steps, cfg.dense_first_layers) == \
        ("topk", "query_head", 0.25, 0)
    assert type(vm).resolve(vm.config, "wan", step_known=False).dense_first_steps == 0.0
    rc = attnproc.registry.REGISTRY.create("rectified")
    wan, hy = type(rc).resolve(rc.config, "wan"), type(rc).resolve(rc.config, "hunyuanvideo")
    assert (wan.drop_rate, wan.first_frame, wan.dense_first_layers) == (0.75, True, 2)
    assert (hy.drop_rate, hy.first_frame) == (0.8, False)
    assert {"vmoba", "rectified"} <= set(attnproc.registry.REGISTRY.names())


@pytest.mark.parametrize("option,value", [("chunk_1d", 99), ("chunk_2d", (2, 99))])
def test_chunk_larger_than_the_grid_names_the_option(option, value):
    """A chunk the pipeline's grid cannot hold is refused when the first sparse call sees the grid (3x8x8 here),
    with the option and the grid in the message; removal restores the stock pipeline."""
    pipe = tiny_pipeline("wan21")
    before = _stock_processors(pipe)
    attnproc.apply(pipe, "vmoba", dense_first_steps=0, **{option: value})
    try:
        with pytest.raises(ValueError, match=rf"vmoba option {option}=.* is larger than this call's token grid "
                                             r"\(3, 8, 8\)"):
            with torch.no_grad():
                pipe(**call_kwargs("wan21", SIZES["wan21"][0]))
    finally:
        attnproc.remove(pipe)
    assert _stock_processors(pipe) == before
