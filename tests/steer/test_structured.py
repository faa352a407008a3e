"""structured (StructureDiffusion): the formula against the reference's definition, exact phrase encodings on
SD 1.x and SDXL (both encoders, pooled untouched), pass-through bit for bit where inactive, batches, schedulers,
composition, and bad input refused with nothing changed."""
import numpy as np
import pytest
import torch

import attnproc
from attnproc.context import StepContext
from attnproc.layout import TokenLayout
from attnproc.method import _DENSE
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.site import CallInputs, Site
from attnproc.steer.structured import Structured, aligned_contexts, structured_attention

PROMPT = "a red circle and a blue square"
PHRASES = ["a red circle", "a blue square"]
SPANS = [[1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 12, 13]]  # CLIP positions (start token at 0) of the two phrases


def reference(q, keys, values, scale):
    """The reference's rule, written out: paired average for equal counts, else every (key, value) pair."""
    def att(k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v

    if len(keys) == len(values):
        return sum(att(k, v) for k, v in zip(keys, values)) / len(keys)
    return sum(att(k, v) for k in keys for v in values) / (len(keys) * len(values))


@pytest.mark.parametrize("n_keys, n_values", [(1, 3), (3, 1), (2, 2), (1, 1)])
def test_formula_matches_the_reference_rule(n_keys, n_values):
    g = torch.Generator().manual_seed(n_keys * 10 + n_values)
    q = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
    keys = [torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(n_keys)]
    values = [torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(n_values)]
    out = structured_attention(q, keys, values, lambda q, k, v: _DENSE.attention(q, k, v, None))
    torch.testing.assert_close(out, reference(q, keys, values, 8 ** -0.5), rtol=1e-12, atol=1e-12)


def test_aligned_contexts_follow_multi_and_single_align():
    full = torch.arange(10.0).reshape(5, 2)
    alone = [torch.full((5, 2), 100.0) + torch.arange(5.0)[:, None], torch.full((5, 2), 200.0) + torch.arange(5.0)[:, None]]
    align = [([1, 2], [1, 2]), ([3], [1])]
    keys, values = aligned_contexts(full, alone, align, "values")
    assert len(keys) == 1 and keys[0] is full and len(values) == 3 and values[0] is full
    assert values[1][:, 0].tolist() == [0, 101, 102, 6, 8] and values[2][:, 0].tolist() == [0, 2, 4, 201, 8]
    keys, values = aligned_contexts(full, alone, align, "conjunction")
    assert [k[:, 0].tolist() for k in keys] == [[0, 2, 4, 6, 8], [0, 101, 102, 6, 8], [0, 2, 4, 201, 8]]
    assert len(values) == 1 and values[0][:, 0].tolist() == [0, 101, 102, 201, 8]
    assert full[:, 0].tolist() == [0, 2, 4, 6, 8]  # the input is never written


# ---- one call on a real cross-attention module ----------------------------------------------------------
@pytest.fixture(scope="module")
def sd15():
    return tiny_pipeline("sd15")


def _encode(pipe, text):
    with torch.no_grad():
        return pipe.encode_prompt(text, "cpu", 1, False)[0][0]


def _heads(attn, x):
    return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)


def _site(attn, context, branches=("uncond", "cond"), step=StepContext(0, 10, 999.0, "batched"), kind="cross"):
    return Site("unet", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2", 1, 0, kind,
                TokenLayout(1, 8, 8, text_len=77, text_position="separate", branches=branches), step, module=attn,
                inputs=CallInputs(hidden_states=None, encoder_hidden_states=context))


@pytest.mark.parametrize("mode", ["values", "conjunction"])
def test_one_call_equals_the_definition_and_passes_the_rest_through(sd15, mode):
    method = attnproc.create("structured", prompt=PROMPT, phrases=PHRASES, mode=mode)
    method.bind(sd15)
    attn = sd15.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    full, empty, other = _encode(sd15, PROMPT), _encode(sd15, ""), _encode(sd15, "a cat")
    alone = [_encode(sd15, p) for p in PHRASES]
    multi = []
    for span, a in zip(SPANS, alone):  # each phrase's own tokens 1..n written at its span
        c = full.clone()
        c[span] = a[1:1 + len(span)]
        multi.append(c)
    single = full.clone()
    for span, a in zip(SPANS, alone):
        single[span] = a[1:1 + len(span)]
    context = torch.stack([empty, other, full, other])  # uncond half, then cond: 'a cat' and the prompt
    q = torch.randn(4, attn.heads, 64, 16)
    with torch.no_grad():
        k, v = _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
        proj = {n: [_heads(attn, getattr(attn, n)(c[None]))[0] for c in cs]
                for n, cs in (("to_k", [full, *multi, single]), ("to_v", [full, *multi, single]))}
        site = _site(attn, context)
        out = method.edit(q, k, v, site, inner=_DENSE)
    dense = _DENSE.attention(q, k, v, site)
    assert torch.equal(out[[0, 1, 3]], dense[[0, 1, 3]])  # uncond rows and the row of another prompt: untouched
    kf, vf = proj["to_k"][0], proj["to_v"][0]
    if mode == "values":
        want = reference(q[2].double(), [kf.double()], [x.double() for x in proj["to_v"][:3]], 16 ** -0.5)
    else:
        want = reference(q[2].double(), [x.double() for x in proj["to_k"][:3]], [proj["to_v"][3].double()], 16 ** -0.5)
    torch.testing.assert_close(out[2].double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[2], dense[2], atol=1e-4)

    for still in (_site(attn, context, step=StepContext(0, 10, 999.0, "uncond"), branches=("uncond",)),
                  _site(attn, context, kind="self"), _site(attn, context, step=None)):
        assert torch.equal(method.edit(q, k, v, still, inner=_DENSE), _DENSE.attention(q, k, v, still))
    late = attnproc.create("structured", prompt=PROMPT, phrases=PHRASES, active_steps=0.5)
    late.bind(sd15)
    site = _site(attn, context, step=StepContext(5, 10, 400.0, "batched"))
    assert torch.equal(late.edit(q, k, v, site, inner=_DENSE), dense)
    with pytest.raises(RuntimeError, match="no conditional prompt of this call is the prompt it was applied with"):
        method.edit(q, k, v, _site(attn, torch.stack([empty, empty, other, other])), inner=_DENSE)


# ---- pipelines ------------------------------------------------------------------------------------------
def _run(pipe, family, **overrides):
    kw = tiny_call_kwargs(family, **{"prompt": PROMPT, "height": 64, "width": 64, "num_inference_steps": 4,
                                     "output_type": "pt", **overrides})
    kw["generator"] = torch.Generator().manual_seed(0)
    return pipe(**kw).images


def _spy(method):
    """Records (step index, steered rows) of every steered call."""
    seen, original = [], method.steered_rows

    def spy(site, batch):
        rows = original(site, batch)
        if rows:
            seen.append((site.step.index, tuple(rows)))
        return rows

    method.steered_rows = spy
    return seen


def test_sd15_pipeline_changes_only_where_active(sd15):
    dense = _run(sd15, "sd15")
    attnproc.apply(sd15, "structured", prompt=PROMPT, active_steps=0.0)
    assert torch.equal(_run(sd15, "sd15"), dense)  # inactive everywhere: bit-identical
    attnproc.remove(sd15)
    handle = attnproc.apply(sd15, "structured", prompt=PROMPT, active_steps=0.5)
    assert [p.text for p in handle.method.phrases] == PHRASES  # found by the chunker
    seen = _spy(handle.method)
    out = _run(sd15, "sd15", num_images_per_prompt=2)
    attnproc.remove(sd15)
    assert {i for i, _ in seen} == {0, 1}  # 2 of 4 steps
    assert {rows for _, rows in seen} == {(2, 3)}  # batched CFG [uncond ×2, cond ×2]: both cond rows
    assert not torch.equal(out[:1], dense)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_any_scheduler_and_a_batch_of_prompts(sd15, scheduler):
    import diffusers

    original = sd15.scheduler
    sd15.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        prompts = [PROMPT, "a cat"]
        dense = _run(sd15, "sd15", prompt=prompts)
        handle = attnproc.apply(sd15, "structured", prompt=PROMPT)
        seen = _spy(handle.method)
        out = _run(sd15, "sd15", prompt=prompts)
        attnproc.remove(sd15)
    finally:
        sd15.scheduler = original
    assert sorted({i for i, _ in seen}) == [0, 1, 2, 3] and {rows for _, rows in seen} == {(2,)}
    assert torch.equal(out[1], dense[1])  # the other prompt's image: bit-identical
    assert not torch.equal(out[0], dense[0])


def test_sdxl_both_encoders_and_pooled_untouched():
    pipe = tiny_pipeline("sdxl")
    handle = attnproc.apply(pipe, "structured", prompt=PROMPT, phrases=PHRASES)
    enc = handle.method.encoded
    with torch.no_grad():
        full = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0][0]
        alone = pipe.encode_prompt(PHRASES[1], device="cpu", do_classifier_free_guidance=False)[0][0]
    assert full.shape[-1] == 64  # both CLIPs' 32 + 32 dims per token
    torch.testing.assert_close(enc.full, full)
    assert enc.alignments[1] == (SPANS[1], [1, 2, 3, 4, 5, 6])
    torch.testing.assert_close(enc.alone[1], alone)
    pooled = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: pooled.append(kw["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True)
    try:
        out = _run(pipe, "sdxl", num_inference_steps=2)
        attnproc.remove(pipe)
        dense = _run(pipe, "sdxl", num_inference_steps=2)
    finally:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(pooled[:2], pooled[2:]))  # the full prompt's pooled embedding
    assert not torch.equal(out, dense)


def test_composes_with_a_sparse_base(sd15):
    base = _run(sd15, "sd15", num_inference_steps=2)
    handle = attnproc.apply(sd15, ["knobs", "structured"], structured={"prompt": PROMPT, "active_steps": 0.0})
    inactive = _run(sd15, "sd15", num_inference_steps=2)
    attnproc.remove(sd15)
    handle = attnproc.apply(sd15, ["knobs", "structured"], structured={"prompt": PROMPT})
    seen = _spy(handle.method.edits[0])
    active = _run(sd15, "sd15", num_inference_steps=2)
    knobs_calls = handle.method.base.sparse_calls
    attnproc.remove(sd15)
    assert torch.equal(inactive, base) and not torch.equal(active, base) and seen and knobs_calls > 0


# ---- bad input: clear errors, nothing changed -----------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(prompt=PROMPT, phrases=["a green circle"]), "'a green circle' is not in the prompt"),
    (dict(prompt=PROMPT, phrases=["a red circle", "circle and a"]), "overlap"),
    (dict(phrases=PHRASES), "give prompt="),
    (dict(prompt="circle"), "no noun phrase of two words or more"),
    (dict(prompt=PROMPT, mode="mean"), "option 'mode' of method 'structured' must be one of 'values', 'conjunction'"),
    (dict(prompt=PROMPT, active_steps=1.5), "option 'active_steps' .* out of range"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(attnproc.OptionError, match=message):
        attnproc.create("structured", **options)


def test_unsupported_pipelines_are_refused_untouched(sd15):
    before = {k: type(v) for k, v in sd15.unet.attn_processors.items()}
    with pytest.raises(attnproc.UnsupportedFamilyError, match="'radial' does not support the model family 'unet'"):
        attnproc.apply(sd15, ["radial", "structured"], structured={"prompt": PROMPT})
    with pytest.raises(ValueError, match="needs prompt="):
        attnproc.apply(sd15, "structured")
    assert {k: type(v) for k, v in sd15.unet.attn_processors.items()} == before
    flux = tiny_pipeline("flux")
    with pytest.raises(attnproc.UnsupportedFamilyError, match="'structured' does not support the model family 'flux'"):
        attnproc.apply(flux, "structured", prompt=PROMPT)
    with pytest.raises(ValueError, match="bare denoiser"):
        attnproc.apply(sd15.unet, "structured", prompt=PROMPT)
    assert {k: type(v) for k, v in sd15.unet.attn_processors.items()} == before
    assert isinstance(attnproc.create("structured", prompt=PROMPT), Structured)
    assert np.isfinite(_run(sd15, "sd15", num_inference_steps=1).numpy()).all()
