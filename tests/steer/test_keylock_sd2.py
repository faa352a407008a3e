"""Key-locking on SD 2.x (diffusers), end to end on a tiny SD 2.x-shaped pipeline (tests/steer/keylock_sd2.py):
covariance, train-concept with the v-prediction target, the edit by the formula (local, and global with
``clip_skip``), save → load → generate bit-identical, and SD 1.5 concepts refused. The ComfyUI side (``clip_h``):
tests/workflows/test_comfy_steer.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.pipelines import tiny_pipeline
from attnproc.steer.keylock import keylock_linear
from attnproc.workflows.train_concept import ConceptConfig, train_concept
from keylock_sd2 import SD2_WIDTH, tiny_sd2_pipeline
from test_keylock import KVRecorder  # noqa: F401  (registers kv_recorder_test)
from test_keylock_clip_skip import _heads, legacy_layout, sd_superclass_by_hand

PROMPT = "a red <flag> in the snow"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny SD 2.x pipeline, its covariance file and a concept trained for 2 steps by train-concept."""
    root = tmp_path_factory.mktemp("sd2")
    (root / "img").mkdir()
    for i in range(2):
        a = np.full((64, 64, 3), 200, np.uint8)
        a[16:48, 16 + 4 * i:40 + 4 * i] = (220, 30, 30)
        Image.fromarray(a).save(root / "img" / f"{i}.png")
    pipe = legacy_layout(tiny_sd2_pipeline())
    cov = cc.save_covariance(cc.estimate_covariance(pipe, ["a red fox in the snow", "a fox", "the snow is white"]),
                             root / "C.safetensors", text_encoder=cc.text_fingerprint(pipe), captions=3, ridge=1e-3)
    start = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    cfg = ConceptConfig(pipeline="sd2 (tiny, in memory)", images=str(root / "img"), token="<flag>", superclass="fox",
                        covariance=str(cov), output=str(root / "out"), steps=2, batch_size=1, grad_accum=1,
                        templates=["a {}"], checkpoint_every=1, lr_values=0.5, lr_embedding=0.5)
    losses = []
    path = train_concept(cfg, pipe=pipe, progress=False, callback=lambda step, loss: losses.append(loss)).concept
    return SimpleNamespace(pipe=pipe, concept=cc.load_concept(path), start=start, path=path, cov=cov, losses=losses,
                           cfg=cfg)


def test_sd2_pipeline_is_sd2_shaped(trained):
    pipe = trained.pipe
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.cross_attention_dim == SD2_WIDTH and pipe.unet.config.use_linear_projection
    assert pipe.text_encoder.config.hidden_act == "gelu"  # OpenCLIP's GELU (CLIP-L: quick_gelu)
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token != pipe.tokenizer.eos_token  # SD 2.x padding
    heads = {m.heads for _, m in cc.cross_attention_modules(pipe.unet)}
    assert {m.to_q.out_features // m.heads for _, m in cc.cross_attention_modules(pipe.unet)} == {64} and heads == {1, 2}


def test_sd2_concept_trains_with_keys_locked(trained):
    pipe, got, start = trained.pipe, trained.concept, trained.start
    assert len(trained.losses) == 2 and all(np.isfinite(trained.losses))
    assert got.i_star.numel() == SD2_WIDTH and list(got.values) == [n for n, _ in cc.cross_attention_modules(pipe.unet)]
    assert not torch.equal(got.embedding, start.embedding)
    assert all(not torch.equal(got.values[n], start.values[n]) for n in got.values)
    assert all(torch.equal(got.keys[n], start.keys[n]) for n in got.keys)
    assert "<flag>" not in pipe.tokenizer.get_vocab()  # train-concept took its token out again


def test_sd2_training_loss_is_on_the_v_target(trained):
    """The first step's loss rebuilt by hand (the step's draws from its seed, the edit at the training β/τ, the EMA
    of i*): the mean squared error to v = √ᾱ·ε − √(1−ᾱ)·x0, not to ε."""
    from diffusers import DDPMScheduler

    from attnproc.workflows.train_concept import encode_latents, load_images

    pipe, cfg = trained.pipe, trained.cfg
    latents = encode_latents(pipe, load_images(cfg, 128)[0]).detach()
    concept = cc.initial_concept(pipe, cfg.token, cfg.superclass, cfg.templates)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    gen = torch.Generator().manual_seed(0)  # step 0, micro-step 0, seed 0
    idx = torch.randint(0, latents.shape[0], (1,), generator=gen)
    torch.randint(0, len(cfg.templates), (1,), generator=gen)  # the template draw (one template)
    attnproc.apply(pipe, "keylock", concepts=[concept], covariance=cc.load_covariance(trained.cov)[0],
                   beta=cfg.train_beta, tau=cfg.train_tau)
    try:
        with torch.no_grad():
            enc, ids = cc.encode_prompts(pipe, [cfg.templates[0].format(cfg.token)])
            concept.i_star.mul_(cfg.ema).add_(enc[ids == pipe.tokenizer.convert_tokens_to_ids(cfg.token)].mean(0),
                                              alpha=1 - cfg.ema)
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, len(alphas), (1,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            pred = pipe.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=enc).sample
    finally:
        attnproc.remove(pipe)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert trained.losses[0] == pytest.approx(float((pred - v).square().mean()), rel=1e-4)
    assert abs(float((pred - noise).square().mean()) - trained.losses[0]) > 1e-2 * trained.losses[0]


@pytest.mark.parametrize("locking, clip_skip", [("local", None), ("global", None), ("global", 1)])
def test_sd2_edit_by_the_formula(trained, locking, clip_skip):
    pipe, con, path, cov = trained.pipe, trained.concept, trained.path, trained.cov
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [str(path)], "covariance": str(cov), "locking": locking})
    try:
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, guidance_scale=7.5, clip_skip=clip_skip,
             generator=torch.Generator().manual_seed(0), output_type="pt")
        name, e, k, v = handle.method.base.seen[0]
        attn = dict(pipe.unet.named_modules())[name]
        c_inv = torch.linalg.inv(cc.load_covariance(cov)[0]).float()
        ctx = e if locking == "local" else torch.stack([e[0], sd_superclass_by_hand(pipe, PROMPT, con, clip_skip)])
        for proj, got, target, context in ((attn.to_k, k, con.keys[name], ctx), (attn.to_v, v, con.values[name], e)):
            want = keylock_linear(context, proj.weight, proj.bias, con.i_star[None], target[None], c_inv, 0.7, 0.15)
            torch.testing.assert_close(got, _heads(want, got), rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)


def test_sd2_save_load_generate_is_bit_identical(trained):
    pipe, con, path, cov = trained.pipe, trained.concept, trained.path, trained.cov
    images = []
    for concept, c in ((con, cc.load_covariance(cov)[0]), (str(path), str(cov))):
        attnproc.apply(pipe, "keylock", concepts=[concept], covariance=c)
        images.append(pipe(PROMPT, num_inference_steps=2, height=64, width=64,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images)
        attnproc.remove(pipe)
    assert torch.equal(images[0], images[1])


def test_sd15_concept_is_refused_on_sd2_and_the_reverse(trained):
    pipe, con, cov = trained.pipe, trained.concept, trained.cov
    sd15 = tiny_pipeline("sd15")
    sd15_concept = cc.initial_concept(sd15, "<dot>", "fox", ["a {}"])
    for target, concept, c in ((pipe, sd15_concept, cc.estimate_covariance(sd15, ["a fox"])),
                               (sd15, con, cc.load_covariance(cov)[0])):
        n = len(target.tokenizer)
        with pytest.raises(attnproc.UnsupportedModelError, match="trained on another model"):
            attnproc.apply(target, "keylock", concepts=[concept], covariance=c, locking="global")  # would hook
        assert len(target.tokenizer) == n and not target.text_encoder._forward_hooks
