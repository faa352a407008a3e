"""SLA as a registered method: through ``apply`` on every served family (video families and the shapes-world
families), its per-module ``proj_l`` (state_dict, .to(), optimizer), the projection file, short sequences."""
from __future__ import annotations

import pytest
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.processor import AttnProcessor
from attnproc.sparse.sla import SLA, SLAWeightsError, auto_block_size, save_sla_weights, sla_block_map

from sparse_helpers import SIZES, call_kwargs, capture, tiny_pipeline

FAMILY_CASES = [(fam, size) for fam, sizes in SIZES.items() for size in sizes] + [("sd15", (None, 64, 96))]


def random_weights(pipe, path, seed=0, variant="main", dims=None):
    """A projection file with random (non-zero) projections for every SLA module of ``pipe``."""
    gen = torch.Generator().manual_seed(seed)
    dims = SLA.weight_dims(pipe) if dims is None else dims
    projs = {name: (torch.randn(d, d, generator=gen) * 0.3, torch.randn(d, generator=gen) * 0.1)
             for name, d in dims.items()}
    return save_sla_weights(path, projs, variant=variant, model=SLA.model_id(pipe)), projs


def linear_branch(q, k, v):
    """``main``'s linear attention with the softmax feature map, written out: phi(q) (phi(K)^T V) / (eps + ...)."""
    fq, fk = torch.softmax(q.double(), -1), torch.softmax(k.double(), -1)
    return (fq @ (fk.transpose(-1, -2) @ v.double())) / (1e-5 + fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))


def oracle(q, k, v, site, attn_mask, scale, topk, proj):
    """What SLA must return for one captured call: dense attention restricted to the visual block map (text keys
    all kept, text queries dense) plus ``proj`` of the linear attention over the visual tokens."""
    layout = site.layout
    vis = layout.visual_slice if site.kind == "joint" and layout.text_len else slice(0, q.shape[2])
    qv, kv = q[:, :, vis], k[:, :, vis]
    n = qv.shape[2]
    b = auto_block_size(n, topk)
    blocks = sla_block_map(qv, kv, block_q=b, block_k=b, topk=topk)
    tok = blocks.repeat_interleave(b, 2).repeat_interleave(b, 3)[:, :, :n, :n]
    keep = torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool)
    keep[:, :, vis, vis] = tok
    mask = keep if attn_mask is None else (keep & attn_mask if attn_mask.dtype == torch.bool else
                                           attn_mask.masked_fill(~keep, float("-inf")))
    out = dense_attention(q, k, v, attn_mask=mask, scale=scale).double()
    W, bias = proj
    out[:, :, vis] += linear_branch(qv, kv, v[:, :, vis]) @ W.double().T + bias.double()
    return out


@pytest.mark.parametrize("family,size", FAMILY_CASES, ids=[f"{f}-{s}" for f, s in FAMILY_CASES])
def test_apply_on_every_family_matches_the_definition(family, size, tmp_path):
    """Default topk (0.1, automatic blocks for these short sequences), trained projections loaded from a file:
    every captured self/joint call equals the oracle; cross-attention is untouched."""
    pipe = tiny_pipeline(family)
    path, projs = random_weights(pipe, tmp_path / "sla.safetensors")
    handle = attnproc.apply(pipe, "sla", weights=str(path))
    calls = capture(handle, limit=4)
    with torch.no_grad():
        pipe(**call_kwargs(family, size))  # two steps (LTX's scheduler needs more than one)
    assert calls
    for q, k, v, site, attn_mask, scale, out in calls:
        assert site.kind in ("self", "joint")
        ref = oracle(q, k, v, site, attn_mask, scale, 0.1, projs[f"{site.denoiser}.{site.name}"])
        assert torch.isfinite(out).all()
        err = float((out.double() - ref).abs().max())
        assert err <= 2e-5 * max(1.0, float(ref.abs().max())), (site.name, err)
    states = handle.states()
    assert set(states) == set(projs)  # one proj_l per self/joint module, none for cross-attention
    handle.remove()


def test_proj_l_is_module_state_saved_moved_and_trained():
    pipe = tiny_pipeline("wan21")
    model = pipe.transformer
    handle = attnproc.apply(pipe, "sla", topk=0.5)
    keys = [k for k in model.state_dict() if ".attnproc.sla." in k]
    assert sorted(keys) == sorted(f"blocks.{i}.attn1.attnproc.sla.{p}" for i in range(2) for p in ("weight", "bias"))
    assert all(float(v.abs().max()) == 0 for k, v in model.state_dict().items() if ".attnproc.sla." in k)
    params = list(handle.parameters())
    assert len(params) == 4
    opt = torch.optim.SGD(params, lr=0.1)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 16, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ctx, return_dict=False)[0]
    out.square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)
    opt.step()
    assert all(float(p.detach().abs().max()) > 0 for p in params)
    model.to(torch.float64)
    assert model.blocks[0].attn1.attnproc.sla.weight.dtype == torch.float64
    model.to(torch.float32)
    handle.remove()
    assert not [k for k in model.state_dict() if ".attnproc." in k]


def test_trained_weights_round_trip_through_apply(tmp_path):
    """save_weights of an applied, changed SLA gives a file apply(weights=) loads into the same values."""
    pipe = tiny_pipeline("wan22")
    handle = attnproc.apply(pipe, "sla", topk=0.5, variant="sla1")
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_()
    saved = {k: v.clone() for k, v in handle.state_dict().items()}
    path = handle.method.save_weights(tmp_path / "w.safetensors", pipe, handle.states())
    handle.remove()
    handle = attnproc.apply(pipe, "sla", topk=0.5, variant="sla1", weights=str(path))
    assert saved.keys() == handle.state_dict().keys() and any("transformer_2." in k for k in saved)
    for key, value in handle.state_dict().items():
        assert torch.equal(value, saved[key]), key
    handle.remove()


def test_the_file_records_the_block_map_it_was_trained_for(tmp_path):
    """A projection is tuned to its feature map and block map: the file says which; another feature map is
    refused before anything changes, another topk or block size warns by name, the same options load silently."""
    import json
    import warnings

    from safetensors import safe_open
    from safetensors.torch import save_file

    pipe = tiny_pipeline("wan21")
    trained = dict(topk=0.25, block_q=4, block_k=2, feature_map="elu")
    handle = attnproc.apply(pipe, "sla", **trained)
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_()
    path = handle.method.save_weights(tmp_path / "w.safetensors", pipe, handle.states())
    handle.remove()
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["trained_with"]) == trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused load refuses; it does not also warn about the block map
        with pytest.raises(SLAWeightsError, match=r"trained with feature_map 'elu', loading with feature_map 'softmax'"):
            attnproc.apply(pipe, "sla", **dict(trained, topk=0.5, feature_map="softmax"), weights=str(path))
    assert _untouched(pipe)
    with pytest.warns(UserWarning, match=r"block_q=None \(trained with 4\), block_k=8 \(trained with 2\)") as seen:
        attnproc.apply(pipe, "sla", topk=0.25, block_k=8, feature_map="elu", weights=str(path)).remove()
    assert [w.filename for w in seen] == [__file__]  # points at the user's apply line, not inside attnproc
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata(), trained_with="[1, 2]")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(SLAWeightsError, match=r"metadata trained_with is not a JSON object of options: '\[1, 2\]'"):
        attnproc.apply(pipe, "sla", **trained, weights=str(tmp_path / "bad.safetensors"))
    assert _untouched(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnproc.apply(pipe, "sla", **trained, weights=str(path)).remove()
    # the family default counts as the value it resolves to (SLA's topk default is 0.1 on every family)
    default = attnproc.apply(pipe, "sla", block_q=4, block_k=2, feature_map="elu")
    path = default.method.save_weights(tmp_path / "d.safetensors", pipe, default.states())
    default.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnproc.apply(pipe, "sla", topk=0.1, block_q=4, block_k=2, feature_map="elu", weights=str(path)).remove()


def _untouched(pipe):
    return not any(isinstance(m.processor, AttnProcessor) for _, m in pipe.transformer.named_modules()
                   if hasattr(m, "processor"))


@pytest.mark.parametrize("problem,match", [
    ("variant", r"trained for variant 'sla1', loading for variant 'main'"),
    ("model", r"trained for model 'transformer=Other:0', loading into model 'transformer=WanTransformer3DModel:"),
    ("missing", r"missing keys: transformer.blocks.1.attn1.bias, transformer.blocks.1.attn1.weight"),
    ("extra", r"unexpected keys: transformer.blocks.9.attn1.bias, transformer.blocks.9.attn1.weight"),
    ("shape", r"transformer.blocks.0.attn1.weight has shape \(4, 4\), expected \(16, 16\)"),
])
def test_weights_that_do_not_fit_are_refused_before_anything_changes(problem, match, tmp_path):
    pipe = tiny_pipeline("wan21")
    dims = SLA.weight_dims(pipe)
    assert dims == {"transformer.blocks.0.attn1": 16, "transformer.blocks.1.attn1": 16}
    if problem == "missing":
        dims = {"transformer.blocks.0.attn1": 16}
    elif problem == "extra":
        dims = dict(dims, **{"transformer.blocks.9.attn1": 16})
    elif problem == "shape":
        dims = dict(dims, **{"transformer.blocks.0.attn1": 4})
    path, _ = random_weights(pipe, tmp_path / "w.safetensors", variant="sla1" if problem == "variant" else "main",
                             dims=dims)
    if problem == "model":
        save_sla_weights(path, {n: (torch.zeros(d, d), torch.zeros(d)) for n, d in dims.items()}, variant="main",
                         model="transformer=Other:0")
    with pytest.raises(SLAWeightsError, match=match):
        attnproc.apply(pipe, "sla", weights=str(path))
    assert _untouched(pipe) and not [k for k in pipe.transformer.state_dict() if ".attnproc." in k]
    with pytest.raises(FileNotFoundError, match="SLA weights file not found"):
        attnproc.apply(pipe, "sla", weights=str(tmp_path / "absent.safetensors"))
    assert _untouched(pipe)


def test_short_sequences_get_smaller_blocks_and_explicit_blocks_are_refused():
    assert auto_block_size(640, 0.1) == 64 and auto_block_size(32760, 0.1) == 64
    assert auto_block_size(577, 0.1) == 64 and auto_block_size(576, 0.1) == 58  # 9 blocks of 64 keep none
    assert auto_block_size(144, 0.1) == 15  # the shapes-world video (9 x 4 x 4 tokens): 10 blocks, 1 kept
    assert auto_block_size(64, 0.5) == 32 and auto_block_size(10, 0.1) == 1 and auto_block_size(9, 0.25) == 2
    for length in range(1, 700):  # always the largest even cut that keeps a block
        for topk in (0.05, 0.1, 0.3, 0.5):
            if length * topk >= 1:
                b = auto_block_size(length, topk)
                assert int(topk * -(-length // b)) >= 1 and b <= 64
    with pytest.raises(ValueError, match=r"topk=0.1 selects no key block of a 9-token sequence even with 1-token "
                                         r"blocks; use topk >= 0.1111"):
        auto_block_size(9, 0.1)
    pipe = tiny_pipeline("wan21")
    handle = attnproc.apply(pipe, "sla", block_q=64, block_k=64)  # 192 tokens: 3 key blocks, topk 0.1 keeps 0
    with pytest.raises(ValueError, match=r"topk=0.1 selects no key block out of 3"):
        with torch.no_grad():
            pipe(**call_kwargs("wan21", SIZES["wan21"][0], num_inference_steps=1))
    handle.remove()


def test_unsupported_family_and_bad_options_are_refused():
    with pytest.raises(attnproc.UnsupportedFamilyError, match="method 'sla' does not support the model family 'sd3'"):
        attnproc.apply(tiny_pipeline("sd3"), "sla")
    pipe = tiny_pipeline("wan21")
    for bad, match in ((dict(topk=0), "topk must be > 0"), (dict(topk=1.5), "'topk'.*out of range"),
                       (dict(variant="v2"), "'variant'"), (dict(weights=3), "'weights'.*must be a string"),
                       (dict(block_k=0), "'block_k'.*out of range")):
        with pytest.raises(attnproc.OptionError, match=match):
            attnproc.apply(pipe, "sla", **bad)
    assert _untouched(pipe)
