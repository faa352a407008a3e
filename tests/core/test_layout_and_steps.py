"""The layout each processor sees, and the step context, on the tiny pipelines."""
import pytest
import torch

import attnproc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline


def _expected_grid(pipe, family, num_frames, height, width):
    """The visual token grid from the pipeline's own compression factors and the transformer's patch size."""
    cfg = pipe.transformer.config
    if family == "ltx":
        t, s = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        pt, ph = pipe.transformer_temporal_patch_size, pipe.transformer_spatial_patch_size
        pw = ph
    else:
        t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if family in ("wan21", "wan22"):
            pt, ph, pw = cfg.patch_size
        else:
            pt, ph, pw = (cfg.patch_size_t or 1), cfg.patch_size, cfg.patch_size
    latent_frames = (num_frames - 1) // t + 1
    return (-(-latent_frames // pt), height // s // ph, width // s // pw)


# (num_frames, height, width): the first size of each family gives a token count that is not a multiple of 128
SIZES = {
    "wan21": [(9, 128, 128), (5, 160, 128), (13, 128, 192)],
    "hunyuanvideo": [(9, 128, 128), (5, 160, 128), (13, 128, 192)],
    "cogvideox": [(9, 128, 128), (5, 160, 128), (13, 128, 192)],
    "ltx": [(9, 192, 160), (17, 256, 256), (9, 320, 256)],
}


@pytest.mark.parametrize("family", sorted(SIZES))
def test_video_layout_matches_latent_grid(family):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, "probe")
    for num_frames, height, width in SIZES[family]:
        handle.method.sites.clear()
        kwargs = tiny_call_kwargs(family, num_frames=num_frames, height=height, width=width,
                                  num_inference_steps=2, output_type="latent")
        pipe(**kwargs)
        grid = _expected_grid(pipe, family, num_frames, height, width)
        sites = handle.method.sites
        assert sites, "no attention call reached the method"
        assert {s.layout.grid for s in sites} == {grid}, (num_frames, height, width)
        for s in sites:
            lay = s.layout
            if s.kind == "joint":
                assert lay.seq_len == lay.visual_len + lay.text_len and lay.text_len > 0
            if s.kind == "cross":
                assert lay.text_position == "separate" and lay.text_len > 0
    tokens = [_expected_grid(pipe, family, *size) for size in SIZES[family]]
    assert any((f * h * w) % 128 for f, h, w in tokens)
    attnproc.remove(pipe)


def test_unet_layout_per_resolution_level():
    pipe = tiny_pipeline("sd15")
    handle = attnproc.apply(pipe, "probe")
    pipe(**tiny_call_kwargs("sd15", height=72, width=56, num_inference_steps=1, output_type="latent"))
    grids = {s.layout.grid for s in handle.method.sites}
    h, w = 72 // 8, 56 // 8
    levels = {(1, h, w)}
    for _ in range(3):
        h, w = (h + 1) // 2, (w + 1) // 2
        levels.add((1, h, w))
    assert grids and grids <= levels and len(grids) >= 2
    cross = [s for s in handle.method.sites if s.kind == "cross"]
    assert cross and all(s.layout.text_len == 77 or s.layout.text_len > 0 for s in cross)
    attnproc.remove(pipe)


def _trace(handle):
    """(denoiser, step index, branch) in the order forward passes happened."""
    seen = []
    for s in handle.method.sites:
        key = (s.denoiser, s.step.index, s.step.branch)
        if not seen or seen[-1] != key:
            seen.append(key)
    return seen


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("cfg", [True, False])
def test_step_context_separate_cfg_passes(steps, cfg):
    pipe = tiny_pipeline("wan21")
    handle = attnproc.apply(pipe, "probe")
    pipe(**tiny_call_kwargs("wan21", num_inference_steps=steps, guidance_scale=5.0 if cfg else 1.0,
                            output_type="latent"))
    branches = ["cond", "uncond"] if cfg else ["cond"]
    assert _trace(handle) == [("transformer", i, b) for i in range(steps) for b in branches]
    timesteps = pipe.scheduler.timesteps
    for s in handle.method.sites:
        assert s.step.num_steps == steps
        assert s.step.timestep == pytest.approx(float(timesteps[s.step.index]))
        assert s.layout.branches == (s.step.branch,)
    attnproc.remove(pipe)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "cogvideox", "ltx"])
@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("cfg", [True, False])
def test_step_context_batched_cfg(family, steps, cfg):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, "probe")
    pipe(**tiny_call_kwargs(family, num_inference_steps=steps, guidance_scale=6.0 if cfg else 1.0,
                            output_type="latent"))
    branch = "batched" if cfg else "cond"
    denoiser = "unet" if family in ("sd15", "sdxl") else "transformer"
    assert _trace(handle) == [(denoiser, i, branch) for i in range(steps)]
    for s in handle.method.sites:
        assert s.layout.branches == (("uncond", "cond") if cfg else ("cond",))
        assert s.step.num_steps == steps
    attnproc.remove(pipe)


@pytest.mark.parametrize("steps", [4, 6])
def test_step_context_wan22_experts(steps):
    pipe = tiny_pipeline("wan22")
    handle = attnproc.apply(pipe, "probe")
    pipe(**tiny_call_kwargs("wan22", num_inference_steps=steps, output_type="latent"))
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    timesteps = pipe.scheduler.timesteps
    expected = [("transformer" if float(timesteps[i]) >= boundary else "transformer_2", i, b)
                for i in range(steps) for b in ("cond", "uncond")]
    assert {d for d, _, _ in expected} == {"transformer", "transformer_2"}, "tiny wan22 should use both experts"
    assert _trace(handle) == expected
    attnproc.remove(pipe)


@pytest.mark.parametrize("family", ["flux", "sd3", "cogvideox", "ltx", "hunyuanvideo", "sdxl"])
def test_step_index_in_every_family(family):
    pipe = tiny_pipeline(family)
    handle = attnproc.apply(pipe, "probe")
    pipe(**tiny_call_kwargs(family, num_inference_steps=3, output_type="latent"))
    indices = [i for _, i, _ in _trace(handle)]
    assert sorted(set(indices)) == [0, 1, 2] and indices == sorted(indices)
    assert all(s.step.num_steps == 3 for s in handle.method.sites)
    attnproc.remove(pipe)
