"""Bad input leaves the pipeline working; processors used through plain set_attn_processor."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

import attnproc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline


def run(pipe, family):
    kwargs = tiny_call_kwargs(family, output_type="pt")
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = pipe(**kwargs)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_pipeline("wan21")
    return pipe, run(pipe, "wan21")


def test_bad_method_or_option_leaves_pipeline_untouched(wan):
    pipe, stock = wan
    before = {n: m.processor for n, m in attnproc.families.attention_modules(pipe.transformer)}
    with pytest.raises(attnproc.UnknownMethodError, match="registered methods: .*dense"):
        attnproc.apply(pipe, "nope")
    with pytest.raises(attnproc.OptionError, match="option 'strength' of method 'knobs' is out of range"):
        attnproc.apply(pipe, "knobs", strength=2.0)
    after = {n: m.processor for n, m in attnproc.families.attention_modules(pipe.transformer)}
    assert after == before and "_diffusers_hook" not in vars(pipe.transformer) or not \
        pipe.transformer._diffusers_hook.hooks
    assert torch.equal(run(pipe, "wan21"), stock)


def test_unsupported_model_names_supported_families():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=4).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = model(x, 10).sample
    with pytest.raises(attnproc.UnsupportedModelError) as e:
        attnproc.apply(model, "dense")
    assert "UNet2DModel" in str(e.value) and "Wan" in str(e.value) and "Flux" in str(e.value)
    assert torch.equal(model(x, 10).sample, ref)
    with pytest.raises(ValueError, match="has no denoiser"):
        attnproc.apply(object(), "dense")
    with pytest.raises(attnproc.UnsupportedModelError):
        attnproc.apply(AutoencoderKL(block_out_channels=(8,), norm_num_groups=4), "dense")


def test_apply_twice_is_refused_and_first_method_keeps_working(wan):
    pipe, stock = wan
    handle = attnproc.apply(pipe, "probe")
    with pytest.raises(attnproc.AlreadyPatchedError, match="already runs attnproc method 'probe'.*remove"):
        attnproc.apply(pipe, "dense")
    out = run(pipe, "wan21")
    assert (out - stock).abs().max() <= 1e-5 and handle.method.sites
    assert attnproc.remove(pipe) is True


def test_remove_on_unpatched_is_a_noop(wan):
    pipe, stock = wan
    assert attnproc.remove(pipe) is False
    assert attnproc.remove(pipe) is False
    assert torch.equal(run(pipe, "wan21"), stock)


def test_non_native_backend_is_refused_not_skipped(wan):
    from diffusers.models.attention_dispatch import attention_backend

    pipe, _ = wan
    attnproc.apply(pipe, "dense")
    try:
        with attention_backend("flex"), pytest.raises(RuntimeError, match="made no scaled_dot_product_attention"):
            run(pipe, "wan21")
    finally:
        attnproc.remove(pipe)


def test_context_parallel_mode_a_method_does_not_serve_is_refused(wan):
    """Real CP runs in tests/core/test_context_parallel.py; here only the refusal path (no process group)."""
    from types import SimpleNamespace

    pipe, stock = wan
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    module = pipe.transformer.blocks[0].attn1
    module.processor._parallel_config = ring  # what enable_parallelism sets on every processor
    try:
        with pytest.raises(attnproc.ContextParallelError, match="'vmoba' does not support diffusers context "
                                                               "parallelism in ring mode.*ulysses_degree=N"):
            attnproc.apply(pipe, "vmoba")
    finally:
        del module.processor._parallel_config
    assert torch.equal(run(pipe, "wan21"), stock)
    attnproc.apply(pipe, "knobs")
    module.processor._parallel_config = ring  # parallelism enabled after apply
    with pytest.raises(attnproc.ContextParallelError, match="'knobs' does not support .*it supports none"):
        run(pipe, "wan21")
    attnproc.remove(pipe)
    assert torch.equal(run(pipe, "wan21"), stock)


@pytest.mark.parametrize("family", ["wan21", "flux", "ltx", "sd15"])
def test_plain_set_attn_processor(family):
    pipe = tiny_pipeline(family)
    stock = run(pipe, family)
    model = pipe.unet if family == "sd15" else pipe.transformer
    model.set_attn_processor(attnproc.processor("dense"))
    assert (run(pipe, family) - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("family, fam", [("cogvideox", "cogvideox"), ("hunyuanvideo", "hunyuanvideo"), ("sd3", "sd3")])
def test_plain_set_attn_processor_legacy_needs_family(family, fam):
    pipe = tiny_pipeline(family)
    stock = run(pipe, family)
    procs = {n: attnproc.processor("dense") for n in pipe.transformer.attn_processors}
    pipe.transformer.set_attn_processor(procs)
    with pytest.raises(RuntimeError, match="pass family="):
        run(pipe, family)
    pipe.transformer.set_attn_processor(attnproc.processor("dense", family=fam))
    assert (run(pipe, family) - stock).abs().max() <= 1e-5


def test_plain_processor_without_layout_explains_what_to_do():
    pipe = tiny_pipeline("wan21")
    pipe.transformer.set_attn_processor(attnproc.processor("knobs"))
    with pytest.raises(RuntimeError, match="needs the token layout.*attnproc.apply"):
        run(pipe, "wan21")


def test_plain_processor_with_explicit_layout():
    pipe = tiny_pipeline("wan21")
    stock = run(pipe, "wan21")
    kw = tiny_call_kwargs("wan21")
    grid = ((kw["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1,
            kw["height"] // pipe.vae_scale_factor_spatial // 2, kw["width"] // pipe.vae_scale_factor_spatial // 2)
    proc = attnproc.processor("knobs", family="wan", layout=attnproc.TokenLayout(*grid))
    pipe.transformer.set_attn_processor(proc)
    out = run(pipe, "wan21")
    assert proc.method.sparse_calls > 0 and (out - stock).abs().max() <= 1e-5


def test_processor_argument_errors():
    with pytest.raises(ValueError, match="unknown family 'mochi'"):
        attnproc.processor("dense", family="mochi")
    with pytest.raises(TypeError, match="TokenLayout"):
        attnproc.processor("dense", layout=(1, 2, 3))


class Halve(attnproc.Edit):
    """Test edit: scales the inner method's output, recording what it wrapped."""

    name = "halve"
    summary = "Test edit: halves the attention output."

    def __init__(self, config=None):
        super().__init__(config)
        self.inner_names = []
        self.bound = None

    def bind(self, target):
        self.bound = target

    def edit(self, q, k, v, site, *, inner, attn_mask=None, scale=None):
        self.inner_names.append(inner.name)
        return 0.5 * inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)


attnproc.register(Halve)


def test_composition_wraps_base_and_validates(wan):
    pipe, stock = wan
    handle = attnproc.apply(pipe, ["knobs", "halve"], knobs={"strength": 0.2})
    assert handle.name == "knobs+halve" and handle.method.edits[0].bound is pipe
    out = run(pipe, "wan21")
    base, edit = handle.method.base, handle.method.edits[0]
    assert base.sparse_calls > 0 and set(edit.inner_names) == {"knobs"}
    assert not torch.allclose(out, stock)
    attnproc.remove(pipe)
    alone = attnproc.apply(pipe, "halve")
    run(pipe, "wan21")
    assert set(alone.method.inner_names) == {"dense"}
    attnproc.remove(pipe)
    with pytest.raises(attnproc.OptionError, match="not in the composition"):
        attnproc.apply(pipe, ["knobs", "halve"], radial={})
    with pytest.raises(ValueError, match="put the base method"):
        attnproc.apply(pipe, ["halve", "knobs"])
    with pytest.raises(ValueError, match="only one base method"):
        attnproc.apply(pipe, ["knobs", "dense"])
    with pytest.raises(attnproc.OptionError, match="out of range"):
        attnproc.apply(pipe, ["knobs", "halve"], knobs={"strength": 3})
    assert torch.equal(run(pipe, "wan21"), stock)
