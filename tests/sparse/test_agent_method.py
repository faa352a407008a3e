"""The registered method ``agent`` on the tiny SD 1.5 and SDXL pipelines: each patched ``attn1`` call equals
``agent_self_attention`` on the same inputs (parity through the pipeline), cross-attention and other levels stay
stock, the output differs from dense, removal is exact; bad options and DiT families are refused."""
from __future__ import annotations

import pytest
import torch

import attnproc
from attnproc.errors import UnsupportedFamilyError
from attnproc.options import OptionError
from attnproc.sparse.agent import (AgentConfig, agent_self_attention, call_generator, first_attention_level,
                                   merge_grid)
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.processor import AttnProcessor

STEPS = 3  # early settings at step 0 (0.4 * 3 rounds to 1), late ones at steps 1 and 2


def _kwargs(name, height, width, batch, cfg):
    kw = tiny_call_kwargs(name, height=height, width=width, num_inference_steps=STEPS, output_type="latent",
                          num_images_per_prompt=batch)
    if not cfg:
        kw["guidance_scale"] = 1.0
    return kw


def _record(unet):
    """Test-side forward hooks: the input and output of every ``attn1`` and ``attn2`` call, the block input before
    it, and the UNet call (= step) it belongs to."""
    calls, step, handles = [], [-1], []
    handles.append(unet.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1)))
    for name, block in unet.named_modules():
        if type(block).__name__ != "BasicTransformerBlock":
            continue
        entering = {}
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, e=entering: e.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True))
        for attr in ("attn1", "attn2"):
            handles.append(getattr(block, attr).register_forward_hook(
                lambda m, a, k, out, e=entering, n=f"{name}.{attr}": calls.append(
                    (n, m, step[0], a[0] if a else k["hidden_states"], e["x"], k.get("encoder_hidden_states"), out)),
                with_kwargs=True))
    return calls, handles


def _stock_attn(module, hidden, context=None):
    """The module's stock output on the same inputs (its stock processor, outside attnproc)."""
    return module.processor.stock(module, hidden, context)


CASES = [  # pipeline, height, width (pixels; latent = /8), batch per prompt, CFG
    ("sd15", 64, 64, 1, True),  # latent 8x8, CFG batch 2 (random destinations)
    ("sd15", 72, 56, 1, False),  # latent 9x7: not divisible by sx=4 / sy=4; batch 1 (top-left destinations)
    ("sd15", 88, 72, 2, True),  # latent 11x9, batch 4
    ("sdxl", 64, 64, 2, False),  # latent 8x8, batch 2 without CFG
    ("sdxl", 104, 72, 1, True),  # latent 13x9
]


@pytest.mark.parametrize("name,height,width,batch,cfg", CASES)
def test_pipeline_parity_with_agent_self_attention(name, height, width, batch, cfg):
    pipe = tiny_pipeline(name)
    unet = pipe.unet
    with torch.no_grad():
        stock = pipe(**_kwargs(name, height, width, batch, cfg)).images
    handle = attnproc.apply(pipe, "agent")
    calls, handles = _record(unet)
    try:
        with torch.no_grad():
            out = pipe(**_kwargs(name, height, width, batch, cfg)).images
    finally:
        for h in handles:
            h.remove()
    config, latent = AgentConfig(), (height // 8, width // 8)
    assert first_attention_level(unet) == 1  # the tiny UNets have attention at full resolution
    merged_calls = 0
    with torch.no_grad():
        for mod_name, attn, step, hidden, block_input, context, got in calls:
            if mod_name.endswith("attn2"):  # cross-attention: the stock output, bit for bit
                assert context is not None and torch.equal(got, _stock_attn(attn, hidden, context))
                continue
            grid = merge_grid(latent, hidden.shape[1], 1)
            if grid is None:  # a lower level: the stock attention, bit for bit
                assert torch.equal(got, _stock_attn(attn, hidden))
                continue
            settings = config.at_step(step, STEPS)
            index = attn.processor.info.index
            want = agent_self_attention(attn, hidden, block_input, grid, settings,
                                        generator=call_generator(0, step, index))
            assert torch.equal(got, want), (mod_name, step)
            assert (got - _stock_attn(attn, hidden)).abs().max() > 1e-4  # the merge changes the call
            merged_calls += 1
    blocks_full_res = sum(1 for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"
                          and merge_grid(latent, _tokens_of(n, latent), 1) is not None)
    assert merged_calls == blocks_full_res * STEPS > 0
    assert (out - stock).abs().max() > 1e-4  # different from dense when active
    attnproc.remove(pipe)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unet.modules())  # block hooks removed
    with torch.no_grad():
        again = pipe(**_kwargs(name, height, width, batch, cfg)).images
    assert torch.equal(again, stock)  # exact removal


def _tokens_of(block_name, latent):
    """Tokens of a tiny UNet transformer block: full resolution in down_blocks.0 / up_blocks.1, half below."""
    full = block_name.startswith(("down_blocks.0.", "up_blocks.1."))
    h, w = latent if full else ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
    return h * w


def test_max_downsample_two_patches_both_levels():
    pipe = tiny_pipeline("sdxl")
    attnproc.apply(pipe, "agent", max_downsample=2)
    calls, handles = _record(pipe.unet)
    try:
        with torch.no_grad():
            pipe(**_kwargs("sdxl", 64, 64, 1, True))
        with torch.no_grad():
            for mod_name, attn, step, hidden, block_input, _, got in calls:
                if mod_name.endswith("attn1"):
                    grid = merge_grid((8, 8), hidden.shape[1], 2)
                    want = agent_self_attention(attn, hidden, block_input, grid, AgentConfig().at_step(step, STEPS),
                                                generator=call_generator(0, step, attn.processor.info.index))
                    assert torch.equal(got, want)
    finally:
        for h in handles:
            h.remove()
        attnproc.remove(pipe)


def test_first_attention_level_is_two_for_sdxl():
    from types import SimpleNamespace

    sdxl = SimpleNamespace(config=SimpleNamespace(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")))
    sd15 = SimpleNamespace(config=SimpleNamespace(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    assert first_attention_level(sdxl) == 2 and first_attention_level(sd15) == 1


@pytest.mark.parametrize("options,match", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"early_agent_ratio": 1.0}, "early_agent_ratio"),
    ({"max_downsample": 3}, "max_downsample"),
])
def test_bad_options_are_refused_before_anything_changes(options, match):
    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(OptionError, match=match):
        attnproc.apply(pipe, "agent", **options)
    assert dict(pipe.unet.attn_processors) == before


def test_window_larger_than_the_latent_is_refused():
    pipe = tiny_pipeline("sd15")
    attnproc.apply(pipe, "agent", early_sx=16)
    try:
        with pytest.raises(ValueError, match=r"sx=16 x sy=4 is larger than the 8x8 token grid"):
            with torch.no_grad():
                pipe(**_kwargs("sd15", 64, 64, 1, True))
    finally:
        attnproc.remove(pipe)


def test_dit_family_refused_without_the_generic_option():
    pipe = tiny_pipeline("flux")
    with pytest.raises(UnsupportedFamilyError, match="set dit=True"):
        attnproc.apply(pipe, "agent")
    assert not any(isinstance(p, AttnProcessor) for p in pipe.transformer.attn_processors.values())
    with pytest.raises(ValueError, match="computes whole attention calls"):
        attnproc.create(["agent", "maskmod"], maskmod={"regions": [{"tokens": [1], "mask": [[1.0]]}]})


def test_dit_option_runs_pooled_agents_on_flux():
    """``dit=True`` on Flux: each joint call is ``pooled_agent_attention`` with the text where Flux puts it (before
    the image) and a 4x4 agent grid; the output differs from dense."""
    from attnproc.sparse.agent import pooled_agent_attention

    from sparse_helpers import capture, output

    pipe = tiny_pipeline("flux")
    kw = lambda: tiny_call_kwargs("flux", num_inference_steps=1, output_type="latent")  # noqa: E731
    with torch.no_grad():
        stock = output(pipe(**kw()))
    handle = attnproc.apply(pipe, "agent", dit=True, dit_agent_grid=4)
    calls = capture(handle, limit=3)
    try:
        with torch.no_grad():
            out = output(pipe(**kw()))
    finally:
        attnproc.remove(pipe)
    assert len(calls) == 3
    for q, k, v, site, mask, scale, got in calls:
        layout = site.layout
        assert site.kind == "joint" and layout.text_position == "before" and layout.text_len > 0
        want = pooled_agent_attention(q, k, v, layout.grid, agent_grid=(1, 4, 4), text_len=layout.text_len,
                                      text_position="before", scale=scale)
        assert torch.equal(got, want)
    assert (out - stock).abs().max() > 1e-4


def test_agents_off_is_plain_tome_through_the_pipeline():
    """``agents=False`` is tomesd's plain ToMe: each patched ``attn1`` output is the stock attention module run on
    the merged tokens, then unmerged (the definition, built here from ``tome_merge`` and the stock processor), at
    every step, with the same windows and generator as ``agent``; with agents on, the early step differs."""
    from attnproc.sparse.agent import tome_merge

    pipe = tiny_pipeline("sd15")
    config, outputs, checked = AgentConfig(), {}, 0
    for agents in (False, True):
        attnproc.apply(pipe, "agent", agents=agents)
        calls, handles = _record(pipe.unet)
        try:
            with torch.no_grad():
                pipe(**_kwargs("sd15", 64, 64, 1, True))
                calls = [c for c in calls if c[0].endswith("attn1") and merge_grid((8, 8), c[3].shape[1], 1)]
                outputs[agents] = [(c[2], c[-1]) for c in calls]
                for mod_name, attn, step, hidden, block_input, _, got in calls if not agents else ():
                    s = config.at_step(step, STEPS)
                    generator = call_generator(0, step, attn.processor.info.index)
                    merged, agent_tokens, unmerge = tome_merge(block_input, hidden, (8, 8), sx=s.sx, sy=s.sy,
                                                               ratio=s.ratio, agent_ratio=0.0, generator=generator)
                    assert agent_tokens is None and merged.shape[1] == 64 - int(64 * 0.4)
                    torch.testing.assert_close(got, unmerge(_stock_attn(attn, merged)), rtol=1e-5, atol=1e-6)
                    checked += 1
        finally:
            for h in handles:
                h.remove()
            attnproc.remove(pipe)
    assert checked == len(outputs[True]) > 0
    # the first block of step 0 sees the same input in both runs: the agents alone change its output
    (step_off, first_off), (step_on, first_on) = outputs[False][0], outputs[True][0]
    assert step_off == step_on == 0 and (first_off - first_on).abs().max() > 1e-4


def test_agents_off_sets_no_agent_ratio_at_any_step():
    early, late = (AgentConfig(agents=False).at_step(i, 10) for i in (0, 9))
    assert (early.sx, early.agent_ratio, late.sx, late.agent_ratio) == (4, 0.0, 2, 0.0)
    assert AgentConfig().at_step(0, 10).agent_ratio == 0.95
