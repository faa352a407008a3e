"""Issue 10, one focused test per numbered item: attnproc must be invisible (``dense``) or refuse clearly under what
diffusers users do (status per item: docs/dropin.md)."""
import pytest
import torch
from diffusers import (FlowMatchHeunDiscreteScheduler, FluxKontextPipeline, HeunDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline)
from diffusers.models.embeddings import ImageProjection

import attnproc
from attnproc import hooks
from attnproc.context import DenoiserContext
from attnproc.families import attention_modules, family_of
from attnproc.processor import AttnProcessor
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline


def images(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = pipe(**kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def step_trace(sites):
    """(index, num_steps) per forward, in call order."""
    seen = []
    for s in sites:
        key = (s.step.index, s.step.num_steps)
        if not seen or seen[-1] != key:
            seen.append(key)
    return seen


def callback_steps(pipe, call):
    seen = []

    def record(p, i, t, kwargs):
        seen.append(i)
        return kwargs
    call(callback_on_step_end=record)
    return seen


# ---- 1. IP-Adapter ------------------------------------------------------------------------------------------
def sd_ip_adapter(unet, tokens: int = 4) -> dict:
    """A random SD-style IP-Adapter state dict for ``unet`` (cross-attention layers get odd ids, as in real ones)."""
    cross = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(1)
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            for proj in ("to_k_ip", "to_v_ip"):
                layers[f"{key}.{proj}.weight"] = torch.randn(inner, cross, generator=gen) * 0.3
            key += 2
    proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=cross, num_image_text_embeds=tokens).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": layers}


def flux_ip_adapter(transformer, clip_dim: int = 32, tokens: int = 4) -> dict:
    """A random Flux IP-Adapter state dict (XLabs layout: one key id per double-stream block, with biases)."""
    joint, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    gen = torch.Generator().manual_seed(1)
    layers, key = {}, 0
    for name in transformer.attn_processors:
        if not name.startswith("single_transformer_blocks"):
            for proj in ("to_k_ip", "to_v_ip"):
                layers[f"{key}.{proj}.weight"] = torch.randn(inner, joint, generator=gen) * 0.3
                layers[f"{key}.{proj}.bias"] = torch.randn(inner, generator=gen) * 0.1
            key += 1
    image_proj = {"proj.weight": torch.randn(tokens * joint, clip_dim, generator=gen) * 0.3,
                  "proj.bias": torch.zeros(tokens * joint), "norm.weight": torch.ones(joint),
                  "norm.bias": torch.zeros(joint)}
    return {"image_proj": image_proj, "ip_adapter": layers}


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def ip_adapter_state(family, pipe) -> dict:
    return flux_ip_adapter(pipe.transformer) if family == "flux" else sd_ip_adapter(pipe.unet)


def ip_inputs(pipe):
    if not hasattr(pipe, "unet"):  # Flux: image embeddings (clip_dim 32), zero ones for the negative branch
        embeds = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))
        return {"ip_adapter_image_embeds": [embeds], "negative_ip_adapter_image_embeds": [torch.zeros_like(embeds)]}
    cross = pipe.unet.config.cross_attention_dim
    embeds = torch.randn(2, 1, cross, generator=torch.Generator().manual_seed(2))  # (uncond, cond) for CFG
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1  # the adapter acts on the left half only
    return {"ip_adapter_image_embeds": [embeds], "cross_attention_kwargs": {"ip_adapter_masks": [mask]}}


def with_ip_adapter(pipe, state):
    denoiser(pipe)._load_ip_adapter_weights([state])
    pipe.set_ip_adapter_scale(1.0)


@pytest.fixture(scope="module", params=["sd15", "sdxl", "flux"])
def ip_stock(request):
    """(family, adapter state, stock output with the adapter); the adapter visibly changes the output."""
    family = request.param
    pipe = tiny_pipeline(family)
    plain = images(pipe, family)
    state = ip_adapter_state(family, pipe)
    with_ip_adapter(pipe, state)
    stock = images(pipe, family, **ip_inputs(pipe))
    assert (stock - plain).abs().max() > 1e-2
    return family, state, stock, plain


def test_item1_ip_adapter_loaded_after_apply(ip_stock):
    family, state, stock, plain = ip_stock
    pipe = tiny_pipeline(family)
    attnproc.apply(pipe, "dense")
    with_ip_adapter(pipe, state)
    assert torch.equal(images(pipe, family, **ip_inputs(pipe)), stock)
    assert all(isinstance(p, AttnProcessor) and p.method is not None for p in denoiser(pipe).attn_processors.values())
    pipe.unload_ip_adapter()  # rebuilds every processor as cls() again; the method comes back, stock is restored
    assert torch.equal(images(pipe, family), plain)
    assert attnproc.remove(pipe)
    assert not any(isinstance(p, AttnProcessor) for p in denoiser(pipe).attn_processors.values())


def test_item1_ip_adapter_loaded_before_apply_keeps_its_effect(ip_stock):
    family, state, stock, _ = ip_stock
    pipe = tiny_pipeline(family)
    with_ip_adapter(pipe, state)
    handle = attnproc.apply(pipe, "probe")
    assert torch.equal(images(pipe, family, **ip_inputs(pipe)), stock)  # SD: with its masks
    # text (joint for Flux) and image attention both ran the method; the image call is cross-attention
    kind = "joint" if family == "flux" else "cross"
    assert {(s.kind, s.call) for s in handle.method.sites if s.call or s.kind == kind} == {(kind, 0), ("cross", 1)}


def test_item1_flux_ip_adapter_with_a_layout_method():
    """The image call of Flux's IP-Adapter processor is cross-attention with its own layout: a method that needs
    layouts runs it (dense, as cross-attention by default) and keeps the adapter's effect."""
    pipe = tiny_pipeline("flux")
    with_ip_adapter(pipe, flux_ip_adapter(pipe.transformer))
    ref = images(pipe, "flux", **ip_inputs(pipe))
    handle = attnproc.apply(pipe, "gna", dense_first_steps=0, kernel_size=3, stride=1, tile=1, backend="dense")
    out = images(pipe, "flux", **ip_inputs(pipe))
    assert not torch.equal(out, ref)  # gna ran sparse on the image tokens ...
    attnproc.remove(pipe)
    pipe.unload_ip_adapter()
    attnproc.apply(pipe, "gna", dense_first_steps=0, kernel_size=3, stride=1, tile=1, backend="dense")
    assert not torch.equal(images(pipe, "flux"), out)  # ... and the adapter still acted under it
    assert handle.method.name == "gna"


def test_item1_wrapper_shows_the_stock_signature_and_rebuilds_as_a_placeholder():
    import inspect

    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    stock = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)
    ours = AttnProcessor(attnproc.create("dense"), stock=stock)
    assert inspect.signature(ours.__call__) == inspect.signature(stock.__call__)
    assert "ip_adapter_masks" in inspect.signature(ours.__call__).parameters
    placeholder = type(ours)()
    assert isinstance(placeholder, AttnProcessor) and placeholder.method is None


# ---- 2. layouts never break dense -----------------------------------------------------------------------------
def test_item2_flux_kontext_dense_matches_stock():
    pipe = FluxKontextPipeline(**tiny_pipeline("flux").components)
    kwargs = dict(image=torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3)), _auto_resize=False)
    stock = images(pipe, "flux", **kwargs)
    attnproc.apply(pipe, "dense")
    assert torch.equal(images(pipe, "flux", **kwargs), stock)
    attnproc.remove(pipe)
    attnproc.apply(pipe, "gna", dense_first_steps=0)  # needs the layout: refused, naming the cause
    with pytest.raises(RuntimeError, match="Flux Kontext's reference-image tokens"):
        images(pipe, "flux", **kwargs)


def test_item2_hook_reads_no_layout_unless_asked():
    """The hook hands the layout over lazily: a forward the family cannot lay out (Kontext-style reference tokens
    appended to the image tokens) runs, and the layout error comes only when someone asks for the layout."""
    pipe = FluxKontextPipeline(**tiny_pipeline("flux").components)
    model = pipe.transformer
    context = DenoiserContext("flux", "transformer")
    hooks.install(model, hooks.StepHook(family_of(model), context, hooks.StepTracker(pipe), hooks.forward_params(model)))
    images(pipe, "flux", image=torch.rand(1, 3, 128, 128), _auto_resize=False, output_type="latent")
    with pytest.raises(RuntimeError, match="flux: img_ids describe"):
        context.last_layout


# ---- 3. processors that make no SDPA call ---------------------------------------------------------------------
def test_item3_default_attn_processor_dense_matches_stock():
    pipe = tiny_pipeline("sd15")
    pipe.unet.set_default_attn_processor()
    stock = images(pipe, "sd15")
    attnproc.apply(pipe, "dense")
    assert torch.equal(images(pipe, "sd15"), stock)


def test_item3_default_attn_processor_other_methods_run_through_the_sdpa_twin():
    pipe = tiny_pipeline("sd15")
    pipe.unet.set_default_attn_processor()
    stock = images(pipe, "sd15")
    handle = attnproc.apply(pipe, "probe")
    torch.testing.assert_close(images(pipe, "sd15"), stock, atol=1e-4, rtol=1e-4)  # AttnProcessor2_0 math
    assert len({s.name for s in handle.method.sites}) == handle.num_patched


def test_item3_custom_diffusion_keeps_its_trained_layers():
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    pipe = tiny_pipeline("sd15")
    torch.manual_seed(6)
    procs = {}
    for name, proc in pipe.unet.attn_processors.items():
        module = pipe.unet.get_submodule(name[: -len(".processor")])
        cross = name.endswith("attn2.processor")
        procs[name] = CustomDiffusionAttnProcessor(
            train_kv=cross, hidden_size=module.to_q.out_features,
            cross_attention_dim=pipe.unet.config.cross_attention_dim if cross else None)
        for p in procs[name].parameters():
            p.data.normal_(0, 0.3)
    pipe.unet.set_attn_processor(procs)
    stock = images(pipe, "sd15")
    attnproc.apply(pipe, "dense")
    assert torch.equal(images(pipe, "sd15"), stock)
    attnproc.remove(pipe)
    handle = attnproc.apply(pipe, "probe")
    torch.testing.assert_close(images(pipe, "sd15"), stock, atol=1e-4, rtol=1e-4)
    assert handle.method.sites


def test_item3_unknown_processor_without_sdpa_names_itself():
    from diffusers.models.attention_processor import AttnProcessor as StockAttnProcessor

    class HandRolled(StockAttnProcessor):  # computes attention itself; diffusers has no SDPA twin for it
        pass

    pipe = tiny_pipeline("sd15")
    pipe.unet.set_attn_processor(HandRolled())
    attnproc.apply(pipe, "probe")
    with pytest.raises(RuntimeError, match="HandRolled computes attention itself") as err:
        images(pipe, "sd15")
    assert "backend" not in str(err.value)


# ---- 4. step index = the denoising loop's index ---------------------------------------------------------------
@pytest.mark.parametrize("family, scheduler", [("sd15", HeunDiscreteScheduler), ("sdxl", HeunDiscreteScheduler),
                                               ("sd3", FlowMatchHeunDiscreteScheduler)])
def test_item4_heun_step_index_is_the_loop_index(family, scheduler):
    pipe = tiny_pipeline(family)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    handle = attnproc.apply(pipe, "probe")
    loop = callback_steps(pipe, lambda **cb: images(pipe, family, num_inference_steps=3, output_type="latent", **cb))
    assert loop == list(range(5))  # Heun: two evaluations per step but the first
    assert step_trace(handle.method.sites) == [(i, 5) for i in loop]


@pytest.mark.parametrize("scheduler", [None, HeunDiscreteScheduler])
def test_item4_img2img_strength_counts_from_the_first_loop_step(scheduler):
    base = tiny_pipeline("sd15")
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    if scheduler is not None:  # the tiny SD 1.5 uses DDIM, which has no begin_index
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    handle = attnproc.apply(pipe, "knobs", dense_first_steps=1, dense_cross=False)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    kwargs = {k: v for k, v in tiny_call_kwargs("sd15", num_inference_steps=4, strength=0.5,
                                                 output_type="latent").items() if k not in ("height", "width")}
    loop = callback_steps(pipe, lambda **cb: pipe(image=image, **kwargs, **cb))
    assert loop == list(range(len(loop))) and 1 < len(loop) < 4 * pipe.scheduler.order
    # dense_first_steps=1: the first loop step ran dense, every later one sparse
    per_step = len(attention_modules(pipe.unet))
    assert handle.method.sparse_calls == per_step * (len(loop) - 1)


def test_item4_video2video_strength():
    from diffusers import WanVideoToVideoPipeline

    components = tiny_pipeline("wan21").components
    pipe = WanVideoToVideoPipeline(**{k: components[k] for k in WanVideoToVideoPipeline._get_signature_keys(
        WanVideoToVideoPipeline)[0]})
    handle = attnproc.apply(pipe, "probe")
    video = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    kwargs = tiny_call_kwargs("wan21", num_inference_steps=4, strength=0.5, output_type="latent")
    kwargs.pop("num_frames")
    text = torch.Generator().manual_seed(5)  # embeddings given: the pipeline's prompt cleaning needs ftfy
    dim = pipe.transformer.config.text_dim
    kwargs.pop("prompt")
    kwargs.update(prompt_embeds=torch.randn(1, 8, dim, generator=text), negative_prompt_embeds=torch.randn(1, 8, dim, generator=text))
    loop = callback_steps(pipe, lambda **cb: pipe(video=video, **kwargs, **cb))
    assert loop == [0, 1]
    assert {(s.step.index, s.step.num_steps) for s in handle.method.sites} == {(0, 2), (1, 2)}


# ---- 5. torch.compile -----------------------------------------------------------------------------------------
def dynamo_counts(run):
    """(graph breaks, recompiles) while ``run()`` executes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run()
    breaks = sum(counters["graph_break"].values())
    return breaks, counters["stats"]["unique_graphs"]


def test_item5_step_hook_adds_no_graph_break_or_recompile():
    """Only our hook on a compiled Wan transformer: the per-step work stays out of the graph."""
    pipe = tiny_pipeline("wan21")
    model = pipe.transformer
    hooks.install(model, hooks.StepHook(family_of(model), DenoiserContext("wan", "transformer"),
                                        hooks.StepTracker(pipe), hooks.forward_params(model)))
    model.compile(backend="eager")
    one = dynamo_counts(lambda: images(pipe, "wan21", num_inference_steps=1, output_type="latent"))
    three = dynamo_counts(lambda: images(pipe, "wan21", num_inference_steps=3, output_type="latent"))
    assert one == (0, 1) and three == (0, 1)  # one graph, reused at every step and branch


def test_item5_apply_accepts_a_compiled_denoiser():
    pipe = tiny_pipeline("sd15")
    stock = images(pipe, "sd15")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    handle = attnproc.apply(pipe, "probe")
    assert handle.num_patched == len(attention_modules(pipe.unet._orig_mod))
    torch.testing.assert_close(images(pipe, "sd15"), stock)
    assert handle.method.sites
    assert attnproc.remove(pipe) and not any(isinstance(m.processor, AttnProcessor) for _, m in
                                             attention_modules(pipe.unet._orig_mod))


@pytest.mark.parametrize("family", ["sd15", "wan21"])  # a legacy (AttnProcessor2_0) and a new-style processor
def test_item5_dense_compiled_fullgraph_matches_stock(family):
    """``dense`` under ``compile(fullgraph=True)``: one graph for all steps and branches (fullgraph raises on any
    graph break), and the same latents as the stock pipeline, bit for bit."""
    pipe = tiny_pipeline(family)
    stock = images(pipe, family, num_inference_steps=3, output_type="latent")
    attnproc.apply(pipe, "dense")
    denoiser = pipe.unet if family == "sd15" else pipe.transformer
    denoiser.compile(backend="eager", fullgraph=True)
    compiled = []
    counts = dynamo_counts(lambda: compiled.append(images(pipe, family, num_inference_steps=3, output_type="latent")))
    assert counts == (0, 1)
    assert torch.equal(compiled[0], stock)


def test_item5_sparse_method_compiled_matches_eager():
    """A method that reads the layout and step works under compile: its resolvers run outside the graph (a break
    per read, counted in benchmarks/compile.py) and the output is the eager one."""
    pipe = tiny_pipeline("wan21")
    stock = images(pipe, "wan21", num_inference_steps=2, output_type="latent")
    # dense at step 0, sparse at step 1 (small blocks: the tiny grid spans several)
    attnproc.apply(pipe, "radial", dense_first_steps=1, dense_first_layers=0, block_size=16, backend="dense")
    eager = images(pipe, "wan21", num_inference_steps=2, output_type="latent")
    assert not torch.equal(eager, stock)
    pipe.transformer.compile(backend="eager")
    compiled = []
    breaks, _ = dynamo_counts(lambda: compiled.append(images(pipe, "wan21", num_inference_steps=2,
                                                             output_type="latent")))
    assert breaks > 0  # it read the layout and step from compiled code
    assert torch.equal(compiled[0], eager)


# ---- 6. fuse_qkv_projections / attention slicing after apply --------------------------------------------------
def test_item6_fused_qkv_keeps_the_method_and_remove_restores_stock():
    pipe = tiny_pipeline("sd15")
    stock = images(pipe, "sd15")
    pipe.fuse_qkv_projections()
    fused_stock = images(pipe, "sd15")
    pipe.unfuse_qkv_projections()
    handle = attnproc.apply(pipe, "probe")
    pipe.fuse_qkv_projections()
    torch.testing.assert_close(images(pipe, "sd15"), fused_stock)
    assert len({s.name for s in handle.method.sites}) == handle.num_patched  # every module still ran the method
    attnproc.remove(pipe)
    pipe.unfuse_qkv_projections()
    procs = list(pipe.unet.attn_processors.values())
    assert not any(isinstance(p, AttnProcessor) for p in procs)
    torch.testing.assert_close(images(pipe, "sd15"), stock)


def test_item6_attention_slicing_after_apply_never_drops_the_method_silently():
    pipe = tiny_pipeline("sd15")
    handle = attnproc.apply(pipe, "probe")
    pipe.enable_attention_slicing(1)
    images(pipe, "sd15")
    assert len({s.name for s in handle.method.sites}) == handle.num_patched  # every module still ran the method


# ---- 7. set_attn_processor on Qwen-Image; remove() leaves nothing behind --------------------------------------
def test_item7_qwenimage_set_attn_processor():
    pipe = tiny_pipeline("qwenimage")
    stock = images(pipe, "qwenimage")
    pipe.transformer.set_attn_processor(attnproc.processor("dense", family="qwenimage"))
    assert torch.equal(images(pipe, "qwenimage"), stock)
    probe = attnproc.processor("probe", family="qwenimage")
    pipe.transformer.set_attn_processor(probe)
    assert torch.equal(images(pipe, "qwenimage"), stock)
    assert {s.kind for s in probe.method.sites} == {"joint"}


def test_item7_remove_leaves_no_hook_registry():
    pipe = tiny_pipeline("wan21")
    attnproc.apply(pipe, "dense")
    attnproc.remove(pipe)
    assert "_diffusers_hook" not in vars(pipe.transformer)
    assert "forward" not in vars(pipe.transformer)
