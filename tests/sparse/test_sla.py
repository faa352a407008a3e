"""SLA against a naive, loop-based reference written from the definition in
shared/methods/sparse-sla-rectified-agent.md §1.2 (both code variants), forward and backward; the weights file."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnproc.kernels import block_sparse_attention
from attnproc.layout import TokenLayout
from attnproc.options import OptionError, build_config
from attnproc.sparse.base import joint_attention
from attnproc.sparse.sla import (
    SLA_DEFAULTS,
    SLAConfig,
    SLAWeightsError,
    load_sla_weights,
    model_fingerprint,
    save_sla_weights,
    sla_attention,
    sla_block_map,
    sla_visual_attention,
)

PHI = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "elu": lambda x: F.elu(x) + 1,
    "relu": torch.relu,
}


# ---- the naive reference (float64, one query at a time) --------------------------------------------------------
def ref_block_map(q, k, bq, bk, topk):
    """Smooth K, mean-pool each run of bq / bk tokens (the last over its real tokens), rank key blocks by the
    pooled dot product, keep min(nK, floor(topk * nK)) per query block."""
    B, H, L, _ = q.shape
    nq, nk = math.ceil(L / bq), math.ceil(L / bk)
    n_sel = min(nk, int(topk * nk))
    sel = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            ks = k[b, h] - k[b, h].mean(dim=0)
            pq = [q[b, h, i * bq:(i + 1) * bq].mean(dim=0) for i in range(nq)]
            pk = [ks[j * bk:(j + 1) * bk].mean(dim=0) for j in range(nk)]
            for i in range(nq):
                scores = [float(pq[i] @ pk[j]) for j in range(nk)]
                for j in sorted(range(nk), key=lambda j: -scores[j])[:n_sel]:
                    sel[b, h, i, j] = True
    return sel


def ref_sla(q, k, v, W, bias, *, bq, bk, topk, variant, feature_map, extra_k=None, extra_v=None):
    """O = Os + W Ol + bias per query, straight from the definition (differentiable, float64)."""
    q, k, v, W, bias = (t.double() for t in (q, k, v, W, bias))
    B, H, L, D = q.shape
    phi = PHI[feature_map]
    sel = ref_block_map(q.detach(), k.detach(), bq, bk, topk)
    rows = []
    for b in range(B):
        for h in range(H):
            for t in range(L):
                chosen = [s for s in range(L) if sel[b, h, t // bq, s // bk]]
                rest = [s for s in range(L) if not sel[b, h, t // bq, s // bk]]
                keys, vals = k[b, h, chosen], v[b, h, chosen]
                if extra_k is not None:
                    keys = torch.cat([keys, extra_k[b, h].double()])
                    vals = torch.cat([vals, extra_v[b, h].double()])
                p = torch.softmax(keys @ q[b, h, t] / math.sqrt(D), dim=0)
                o_s = p @ vals
                lin = list(range(L)) if variant == "main" else rest
                fq = phi(q[b, h, t])
                w = phi(k[b, h, lin]) @ fq  # one weight per key
                if variant == "main":
                    o_l = (w @ v[b, h, lin]) / (1e-5 + w.sum())
                elif not lin or float(w.detach().sum()) == 0.0:
                    o_l = torch.zeros(v.shape[-1], dtype=torch.float64)
                else:
                    o_l = (w @ v[b, h, lin]) / w.sum()
                rows.append(o_s + W @ o_l + bias)
    return torch.stack(rows).reshape(B, H, L, -1)


def make(B=1, H=2, L=37, D=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=dtype) for _ in range(3))
    W = torch.randn(D, D, generator=gen, dtype=dtype) * 0.3
    bias = torch.randn(D, generator=gen, dtype=dtype) * 0.1
    return q, k, v, W, bias


CASES = [  # (L, block_q, block_k, topk): ragged tails, rectangular blocks, exact blocks, every block selected
    (37, 8, 4, 0.3),
    (48, 16, 16, 0.5),
    (29, 8, 8, 1.0),
    (21, 1, 1, 0.15),  # token-level maps (the granularity docs/sla.md fine-tunes the shapes-world video at)
]


def test_block_map_matches_reference():
    for L, bq, bk, topk in CASES:
        q, k, *_ = make(L=L, seed=L)
        got = sla_block_map(q, k, block_q=bq, block_k=bk, topk=topk)
        assert torch.equal(got, ref_block_map(q.double(), k.double(), bq, bk, topk))
        assert (got.sum(-1) == min(got.shape[-1], int(topk * got.shape[-1]))).all()


@pytest.mark.parametrize("variant", ["main", "sla1"])
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_reference_fp32(variant, feature_map, case):
    L, bq, bk, topk = case
    q, k, v, W, bias = make(L=L, seed=L)
    ins = [t.clone().requires_grad_() for t in (q, k, v, W, bias)]
    out = sla_attention(*ins, block_q=bq, block_k=bk, topk=topk, variant=variant, feature_map=feature_map)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v, W, bias)]
    ref = ref_sla(*ref_ins, bq=bq, bk=bk, topk=topk, variant=variant, feature_map=feature_map)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 1e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, ins, g)
    ref_grads = torch.autograd.grad(ref, ref_ins, g.double())
    for name, a, r in zip(("q", "k", "v", "proj_weight", "proj_bias"), grads, ref_grads):
        err = (a.double() - r).abs().max() / max(1.0, r.abs().max())
        assert err <= 1e-5, (name, float(err))


def test_variants_differ_and_sla1_is_sparse_only_when_everything_is_selected():
    q, k, v, W, bias = make(L=40)
    main = sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=0.4, variant="main")
    sla1 = sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=0.4, variant="sla1")
    assert (main - sla1).abs().max() > 1e-2
    # all blocks selected: SLA-1's linear branch is empty (0), so only the bias is added to full attention
    full = sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=1.0, variant="sla1")
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (full - (dense + bias)).abs().max() < 1e-5


def test_zero_projection_is_plain_block_sparse_attention():
    q, k, v, _, _ = make(L=70, D=16)
    W, bias = torch.zeros(16, 16), torch.zeros(16)
    bm = sla_block_map(q, k, block_q=16, block_k=16, topk=0.25)
    for variant in ("main", "sla1"):
        out = sla_attention(q, k, v, W, bias, block_q=16, block_k=16, topk=0.25, variant=variant)
        assert torch.allclose(out, block_sparse_attention(q, k, v, bm, 16, backend="dense"), atol=1e-6)


@pytest.mark.parametrize("variant", ["main", "sla1"])
def test_extra_keys_join_the_sparse_softmax(variant):
    q, k, v, W, bias = make(L=30)
    gen = torch.Generator().manual_seed(5)
    ek, ev = torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    out = sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=0.5, variant=variant, extra_k=ek, extra_v=ev)
    ref = ref_sla(q, k, v, W, bias, bq=8, bk=8, topk=0.5, variant=variant, feature_map="softmax",
                  extra_k=ek, extra_v=ev)
    assert (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["main", "sla1"])
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_gradcheck_float64(variant, feature_map):
    q, k, v, W, bias = make(H=1, L=13, D=3, dtype=torch.float64)
    ins = tuple(t.requires_grad_() for t in (q, k, v, W, bias))

    def f(*a):
        return sla_attention(*a, block_q=4, block_k=4, topk=0.5, variant=variant, feature_map=feature_map)

    assert torch.autograd.gradcheck(f, ins, fast_mode=True)


def test_never_nan():
    # relu features of an all-negative query vanish: SLA-1's reference divides 0 by 0, we return the sparse part
    q, k, v, W, bias = make(L=16, D=4)
    q[:, :, :8] = -q[:, :, :8].abs() - 0.1
    out = sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=0.5, variant="sla1", feature_map="relu")
    assert torch.isfinite(out).all()
    bm = sla_block_map(q, k, block_q=8, block_k=8, topk=0.5)
    sparse = block_sparse_attention(q, k, v, bm, 8, backend="dense")
    assert torch.allclose(out[:, :, :8], sparse[:, :, :8] + bias, atol=1e-6)


def test_low_precision_runs_close_to_fp32():
    q, k, v, W, bias = make(L=130, D=16, seed=3)
    ref = sla_attention(q, k, v, W, bias, topk=0.5)
    for dt in (torch.float16, torch.bfloat16):
        out = sla_attention(q.to(dt), k.to(dt), v.to(dt), W, bias, topk=0.5)
        assert out.dtype == dt and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 5e-2


def test_bad_arguments_are_refused_by_name():
    q, k, v, W, bias = make(L=32)
    with pytest.raises(ValueError, match=r"topk=0.1 selects no key block out of 4.*topk >= 0.25"):
        sla_attention(q, k, v, W, bias, block_q=8, block_k=8, topk=0.1)
    bad = [
        (dict(topk=0.0), "topk must be a number in"),
        (dict(topk=1.5), "topk must be a number in"),
        (dict(variant="paper"), "variant must be one of"),
        (dict(feature_map="hedgehog"), "feature_map must be one of"),
        (dict(block_q=0), "block_q must be a positive int"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            sla_attention(q, k, v, W, bias, **kw)
    with pytest.raises(ValueError, match=r"proj_weight must be \[8, 8\]"):
        sla_attention(q, k, v, W[:4], bias)
    with pytest.raises(ValueError, match="q and k must be"):
        sla_attention(q, k[:, :, :20], v, W, bias)


# ---- config and the visual-attention function ---------------------------------------------------------------------
def test_config_options_and_family_defaults():
    cfg = build_config(SLAConfig, "sla", {"topk": 0.2, "variant": "sla1"})
    assert cfg.resolved("wan").topk == 0.2
    assert build_config(SLAConfig, "sla", {}).resolved("hunyuanvideo").topk == SLA_DEFAULTS["hunyuanvideo"]["topk"]
    with pytest.raises(OptionError, match="'topk'.*out of range"):
        build_config(SLAConfig, "sla", {"topk": 2})
    with pytest.raises(OptionError, match="topk must be > 0"):
        build_config(SLAConfig, "sla", {"topk": 0})
    with pytest.raises(OptionError, match="'variant'.*'main', 'sla1'"):
        build_config(SLAConfig, "sla", {"variant": "x"})
    with pytest.raises(ValueError, match="does not support the model family 'sd3'"):
        SLAConfig().resolved("sd3")


def test_visual_attention_in_a_joint_call_matches_reference():
    """Text before the visual tokens (CogVideoX order): visual queries run SLA with the text keys as extra keys,
    text queries run dense."""
    layout = TokenLayout(frames=2, height=3, width=5, text_len=4, text_position="before")
    gen = torch.Generator().manual_seed(2)
    S, D = layout.seq_len, 8
    q, k, v = (torch.randn(1, 2, S, D, generator=gen) for _ in range(3))
    proj = torch.nn.Linear(D, D)
    cfg = SLAConfig(topk=0.5, block_q=8, block_k=8).resolved("cogvideox")

    def visual(qv, kv, vv, ek, ev, scale):
        return sla_visual_attention(qv, kv, vv, ek, ev, scale, config=cfg, layout=layout, proj=proj)

    with torch.no_grad():
        out = joint_attention(q, k, v, layout, visual_attention=visual)
        vis, txt = layout.visual_slice, layout.text_slice
        ref = ref_sla(q[:, :, vis], k[:, :, vis], v[:, :, vis], proj.weight, proj.bias, bq=8, bk=8, topk=0.5,
                      variant="main", feature_map="softmax", extra_k=k[:, :, txt], extra_v=v[:, :, txt])
    assert (out[:, :, vis].double() - ref).abs().max() <= 1e-5
    assert torch.allclose(out[:, :, txt], F.scaled_dot_product_attention(q[:, :, txt], k, v), atol=1e-6)
    # the family default (topk 0.1) keeps no block of this 4-block video: refused, not NaN
    small = SLAConfig(block_q=8, block_k=8).resolved("cogvideox")
    with pytest.raises(ValueError, match="selects no key block"):
        sla_visual_attention(q[:, :, vis], k[:, :, vis], v[:, :, vis], None, None, None, config=small,
                             layout=layout, proj=proj)
    with pytest.raises(ValueError, match="resolved config"):
        sla_visual_attention(q[:, :, vis], k[:, :, vis], v[:, :, vis], None, None, None, config=SLAConfig(),
                             layout=layout, proj=proj)


# ---- the per-module projection file ---------------------------------------------------------------------------------
def test_weights_file_round_trip_and_refusals(tmp_path):
    gen = torch.Generator().manual_seed(0)
    projs = {"blocks.0.attn1": torch.nn.Linear(8, 8), "blocks.1.attn1": torch.nn.Linear(8, 8)}
    for p in projs.values():
        torch.nn.init.normal_(p.weight, generator=gen)
    model = model_fingerprint(torch.nn.Linear(3, 3))
    path = save_sla_weights(tmp_path / "sla.safetensors", projs, variant="main", model=model)
    assert not list(tmp_path.glob("*.partial"))
    dims = {"blocks.0.attn1": 8, "blocks.1.attn1": 8}
    got = load_sla_weights(path, dims, variant="main", model=model)
    for name, p in projs.items():
        assert torch.equal(got[name][0], p.weight.detach()) and torch.equal(got[name][1], p.bias.detach())

    def refused(match, **kw):
        args = dict(dims=dims, variant="main", model=model) | kw
        with pytest.raises(SLAWeightsError, match=match):
            load_sla_weights(path, args["dims"], variant=args["variant"], model=args["model"])

    refused(r"trained for variant 'main', loading for variant 'sla1'", variant="sla1")
    refused(r"trained for model 'Linear:[0-9a-f]+', loading into model 'Other:1'", model="Other:1")
    refused(r"missing keys: blocks.2.attn1.bias, blocks.2.attn1.weight", dims=dims | {"blocks.2.attn1": 8})
    refused(r"unexpected keys: blocks.1.attn1.bias, blocks.1.attn1.weight", dims={"blocks.0.attn1": 8})
    refused(r"blocks.0.attn1.weight has shape \(8, 8\), expected \(4, 4\)", dims=dims | {"blocks.0.attn1": 4})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SLAWeightsError, match="not a readable safetensors file"):
        load_sla_weights(tmp_path / "junk.safetensors", dims, variant="main")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sla_weights(tmp_path / "absent.safetensors", dims, variant="main")
    assert model_fingerprint(torch.nn.Linear(3, 3)) != model_fingerprint(torch.nn.Linear(3, 4))
