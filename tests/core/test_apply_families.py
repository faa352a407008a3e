"""apply/remove on the tiny pipeline of every family: dense parity, exact removal, loading path."""
import numpy as np
import pytest
import torch

import attnproc
from attnproc.pipelines import FAMILIES, tiny_call_kwargs, tiny_pipeline


def run(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, output_type="pt", **overrides)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = pipe(**kwargs)
    x = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_matches_stock_and_remove_is_exact(family):
    pipe = tiny_pipeline(family)
    stock_procs = {name: id(p) for name, p in _processors(pipe).items()}
    stock = run(pipe, family)
    handle = attnproc.apply(pipe, "dense")
    assert handle.num_patched > 0
    assert {d.family for d in handle.denoisers.values()} == {attnproc.pipelines.tiny_record(family).family}
    patched = run(pipe, family)
    assert (patched - stock).abs().max().item() <= 1e-5
    assert attnproc.remove(pipe) is True
    assert {name: id(p) for name, p in _processors(pipe).items()} == stock_procs  # the very same objects
    assert torch.equal(run(pipe, family), stock)


def _processors(pipe):
    procs = {}
    for den in ("unet", "transformer", "transformer_2"):
        model = getattr(pipe, den, None)
        if model is not None:
            procs.update({f"{den}.{n}": m.processor for n, m in attnproc.families.attention_modules(model)})
    return procs


def test_every_attention_module_is_patched_or_reported():
    pipe = tiny_pipeline("hunyuanvideo")
    handle = attnproc.apply(pipe, "dense")
    patch = handle.denoisers["transformer"]
    assert patch.family == "hunyuanvideo"
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in patch.patched)
    assert patch.skipped and all("token_refiner" in n for n in patch.skipped)  # text-only attention stays stock
    assert "hunyuanvideo" in str(handle)
    attnproc.remove(pipe)


def test_wan22_patches_both_experts():
    pipe = tiny_pipeline("wan22")
    handle = attnproc.apply(pipe, "probe")
    assert set(handle.denoisers) == {"transformer", "transformer_2"}
    run(pipe, "wan22")
    seen = {s.denoiser for s in handle.method.sites}
    assert seen == {"transformer", "transformer_2"}
    attnproc.remove(pipe)


def test_real_loading_path(tmp_path):
    pipe = tiny_pipeline("wan21")
    stock = run(pipe, "wan21")
    pipe.save_pretrained(tmp_path / "tiny-wan")
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "tiny-wan")
    loaded.set_progress_bar_config(disable=True)
    handle = attnproc.apply(loaded, "probe")
    out = run(loaded, "wan21")
    assert (out - stock).abs().max().item() <= 1e-5
    assert handle.method.sites and all(s.layout is not None for s in handle.method.sites)
    attnproc.remove(loaded)
