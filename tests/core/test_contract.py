"""The method contract: per-module state (saved, moved, trained), call inputs and index, block input,
capabilities, typed errors, and one vocabulary of family names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnproc
from attnproc.families import FAMILIES
from attnproc.kernels import dense_attention
from attnproc.pipelines import tiny_pipeline
from attnproc.processor import AttnProcessor, ModuleInfo


class Corrected(attnproc.SparseMethod):
    """Test method in the shape SLA takes: visual attention plus a learned per-module correction ``proj(out)``
    (zero-initialised, so it starts exactly dense). Records what each call saw."""

    name = "corrected_test"
    summary = "test: dense visual attention plus a zero-initialised per-module projection"
    families = ("wan",)
    needs_block_input = True

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    def create_state(self, site):
        head_dim = site.module.inner_dim // site.module.heads
        proj = torch.nn.Linear(head_dim, head_dim)
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
        return proj

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        self.seen.append(site)
        return super().attention(q, k, v, site, attn_mask=attn_mask, scale=scale)

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        out = dense_attention(q, k, v, scale=scale)
        return out + self.module_state(site)(out)


if "corrected_test" not in attnproc.registry.REGISTRY.names():
    attnproc.register(Corrected)


def _wan_inputs(pipe, batch=1):
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, cfg.in_channels, 3, 16, 16, generator=g),
                timestep=torch.tensor([500.0] * batch),
                encoder_hidden_states=torch.randn(batch, 16, cfg.text_dim, generator=g), return_dict=False)


def test_module_state_is_saved_trained_and_removed():
    pipe = tiny_pipeline("wan21")
    model = pipe.transformer
    inputs = _wan_inputs(pipe)
    with torch.no_grad():
        stock = model(**inputs)[0]
    handle = attnproc.apply(pipe, "corrected_test")
    keys = [k for k in model.state_dict() if ".attnproc." in k]
    assert "blocks.0.attn1.attnproc.corrected_test.weight" in keys and "blocks.1.attn2.attnproc.corrected_test.bias" in keys
    assert set(handle.state_dict()) == {f"transformer.{k}" for k in keys}
    with torch.no_grad():
        assert (model(**inputs)[0] - stock).abs().max() <= 1e-5  # zero-init: exactly the dense path
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    opt = torch.optim.SGD(list(handle.parameters()), lr=0.5)
    model(**inputs)[0].square().mean().backward()
    opt.step()
    after = handle.state_dict()
    trained = [k for k in before if ".attn1." in k and not torch.equal(before[k], after[k])]
    assert trained and all(not torch.equal(before[k], after[k]) for k in before if ".attn1." in k)
    assert all(torch.equal(before[k], after[k]) for k in before if ".attn2." in k)  # cross runs dense: no grad
    with torch.no_grad():
        assert (model(**inputs)[0] - stock).abs().max() > 1e-4  # the trained state changes the output
    model.to(torch.float64)
    assert model.blocks[0].attn1.attnproc.corrected_test.weight.dtype == torch.float64
    model.to(torch.float32)
    attnproc.remove(pipe)
    assert not [k for k in model.state_dict() if ".attnproc." in k]
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], stock)


def test_call_inputs_and_block_input_reach_the_method():
    pipe = tiny_pipeline("wan21")
    model = pipe.transformer
    entering = {}
    mine = [b.register_forward_pre_hook(lambda m, a, i=i: entering.__setitem__(i, a[0]))
            for i, b in enumerate(model.blocks)]
    handle = attnproc.apply(pipe, "corrected_test")
    inputs = _wan_inputs(pipe)
    with torch.no_grad():
        model(**inputs)
    for h in mine:
        h.remove()
    sites = handle.method.seen
    assert {s.name for s in sites} == {f"blocks.{i}.{a}" for i in range(len(model.blocks)) for a in ("attn1", "attn2")}
    for s in sites:
        assert s.call == 0 and s.inputs.block_input is entering[s.layer]
        ctx = s.inputs.encoder_hidden_states
        if s.kind == "cross":
            assert ctx is not None and ctx.shape[:2] == (1, 16)  # the projected text context, 16 tokens
        else:
            assert ctx is None and s.inputs.hidden_states.shape[1] == 3 * 8 * 8
    attnproc.remove(pipe)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


class _TwoCalls:
    """A stock processor making two SDPA calls (like Wan I2V: text context, then image context)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        q = hidden_states[:, None]
        a = F.scaled_dot_product_attention(q, encoder_hidden_states[:, None], encoder_hidden_states[:, None])
        b = F.scaled_dot_product_attention(q, q, q, is_causal=kwargs.get("causal", False))
        return (a + b)[:, 0]


class _Probe(attnproc.Method):
    name = "probe_calls"
    summary = "records sites"

    def __init__(self, config=None):
        super().__init__(config)
        self.sites = []

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        self.sites.append(site)
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def test_call_index_counts_sdpa_calls_inside_one_processor_call():
    method = _Probe()
    proc = AttnProcessor(method, stock=_TwoCalls(), info=ModuleInfo(FAMILIES["wan"], "transformer", "blocks.0.attn2",
                                                                    0, 0, "cross"))
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    out = proc(torch.nn.Identity(), x, ctx)
    assert [s.call for s in method.sites] == [0, 1]
    assert all(s.inputs.encoder_hidden_states is ctx for s in method.sites)
    ref = _TwoCalls()(None, x, ctx)
    assert torch.allclose(out, ref, atol=1e-6)


def test_block_input_without_apply_is_a_clear_error():
    class NeedsBlock(_Probe):
        needs_block_input = True

        def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
            return self.block_input(site)

    info = ModuleInfo(FAMILIES["wan"], "transformer", "blocks.0.attn2", 0, 0, "cross")
    with pytest.raises(attnproc.BlockInputUnavailableError, match="only attnproc.apply"):
        AttnProcessor(NeedsBlock(), stock=_TwoCalls(), info=info)(torch.nn.Identity(), torch.randn(1, 4, 8),
                                                                  torch.randn(1, 3, 8))


def test_sdpa_extras_follow_declared_capabilities():
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    info = ModuleInfo(FAMILIES["wan"], "transformer", "blocks.0.attn2", 0, 0, "cross")
    with pytest.raises(attnproc.UnsupportedCallError, match="does not support SDPA options \\['is_causal'\\]"):
        AttnProcessor(_Probe(), stock=_TwoCalls(), info=info)(torch.nn.Identity(), x, ctx, causal=True)
    dense = attnproc.create("dense")
    assert "is_causal" in dense.sdpa_extras
    out = AttnProcessor(dense, stock=_TwoCalls(), info=info)(torch.nn.Identity(), x, ctx, causal=True)
    assert torch.allclose(out, _TwoCalls()(None, x, ctx, causal=True), atol=1e-6)


def test_errors_share_one_base():
    for err in (attnproc.OptionError, attnproc.UnknownMethodError, attnproc.UnsupportedModelError,
                attnproc.LayoutUnavailableError, attnproc.StepUnavailableError, attnproc.NonNativeBackendError,
                attnproc.ContextParallelError, attnproc.AlreadyPatchedError, attnproc.UnsupportedCallError):
        assert issubclass(err, attnproc.AttnprocError)
    assert issubclass(attnproc.UnsupportedFamilyError, attnproc.UnsupportedModelError)
    with pytest.raises(attnproc.StepUnavailableError):
        attnproc.create("knobs", dense_first_steps=2).attention(
            *(torch.randn(1, 1, 4, 8) for _ in range(3)),
            attnproc.Site("wan", None, "x", 0, 0, "self", attnproc.TokenLayout(1, 2, 2), None))
    with pytest.raises(ValueError, match="Site.kind must be one of"):
        attnproc.Site("wan", None, "x", 0, 0, "selfish", None, None)


class _Halve(attnproc.Edit):
    name = "halve_contract_test"
    summary = "test: halves the inner output"

    def edit(self, q, k, v, site, *, inner, attn_mask=None, scale=None):
        return 0.5 * inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)


def test_composition_chain_is_built_once_and_reprs():
    comp = attnproc.Composed(attnproc.create("dense"), [_Halve(), _Halve()])
    chain = comp._chain
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    site = attnproc.Site("wan", None, "x", 0, 0, "self", None, None)
    assert torch.allclose(comp.attention(q, k, v, site), 0.25 * dense_attention(q, k, v), atol=1e-6)
    assert comp._chain is chain and comp.name == "dense+halve_contract_test+halve_contract_test"
    assert repr(chain).count("around") == 2  # _Wrapped has a repr (it raised AttributeError)


# ---- one vocabulary of family names (issue 11, item 6) -------------------------------------------------------
def test_processor_accepts_family_aliases():
    assert attnproc.processor("dense", family="wan21").info.family.name == "wan"
    assert attnproc.processor("dense", family="sd15").info.family.name == "unet"
    with pytest.raises(attnproc.UnsupportedFamilyError, match="unknown family 'mochi'.*wan \\(also wan21, wan22\\)"):
        attnproc.processor("dense", family="mochi")


def test_processor_without_family_says_what_to_pass():
    with pytest.raises(attnproc.UnsupportedFamilyError, match="needs to know the model family; pass family="):
        attnproc.processor("radial")
    with pytest.raises(attnproc.UnsupportedFamilyError, match="model family 'unet' \\(Stable Diffusion"):
        attnproc.processor("radial", family="sd15")


def test_method_on_unsupported_family_is_unsupported_model_error():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(attnproc.UnsupportedModelError, match="family 'unet' .*supported families: wan"):
        attnproc.apply(pipe, "radial")
    with pytest.raises(attnproc.UnsupportedModelError, match="family 'unet'"):
        attnproc.apply(pipe, "gna")


def test_tiny_pipeline_records_speak_the_family_vocabulary():
    from attnproc.families import family_named
    from attnproc.pipelines import NAMES, TINY_PIPELINES, tiny_record

    assert tiny_record("wan").name == "wan21" and tiny_record("unet").name == "sd15"
    assert tiny_record("wan22").family == "wan" and tiny_record("sdxl").family == "unet"
    assert all(family_named(r.family).name == r.family for r in TINY_PIPELINES.values())
    assert all(family_named(n).name == TINY_PIPELINES[n].family for n in NAMES)  # every tiny name is an alias
    with pytest.raises(ValueError, match="unknown tiny pipeline 'mochi'; valid: sd15 \\(family unet\\)"):
        tiny_record("mochi")


def test_configs_stay_plain_values():
    from attnproc.steer.maskmod import MaskMod

    regions = [{"phrase": "a red fox", "box": [0, 0, 0.5, 1]}]
    cfg = attnproc.create("maskmod", prompt="a red fox in the snow", regions=regions).config
    assert not hasattr(cfg, "_parsed") and cfg.regions == regions
    a, b = MaskMod(cfg), MaskMod(cfg)
    a.regions[0].tokens = [1, 2]  # what bind() does with the pipeline's tokenizer
    assert b.regions[0].tokens is None  # another method built from the same config is unaffected
    radial = attnproc.create("radial")
    site = attnproc.Site("wan", None, "x", 0, 0, "self", attnproc.TokenLayout(2, 4, 4), None)
    assert radial.config_for(site).decay == 0.2 and radial.config.decay is None  # resolved copy; config untouched


def test_family_variant_defaults_are_chosen_at_bind():
    radial = attnproc.create("radial")
    step = attnproc.StepContext(index=0, num_steps=40, timestep=900.0)
    site = attnproc.Site("wan", "transformer_2", "blocks.0.attn1", 0, 0, "self", attnproc.TokenLayout(2, 4, 4), step)
    radial.bind(tiny_pipeline("wan22"))  # two experts: Wan 2.2's reference defaults
    assert radial.config_for(site).decay == 0.8 and radial.config_for(site).dense_first_steps == 0.275
    radial.bind(tiny_pipeline("wan21"))
    assert radial.config_for(site).decay == 0.2
