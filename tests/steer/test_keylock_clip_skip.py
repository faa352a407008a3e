"""Global key-locking with ``clip_skip``: the superclass prompt is encoded from the hidden layer (and with the
final-layer-norm handling) the pipeline used for the call, so keys equal a reference encoded by hand.

diffusers' SD 1.x/2.x ``clip_skip`` path reads ``text_encoder.text_model.final_layer_norm``, which transformers >= 5.6
removed from ``CLIPTextModel`` (diffusers issue #14124: the pipeline itself fails there). The SD 1.5 tests give the
pipeline an encoder with the transformers 4.x attribute (:class:`LegacyLayoutCLIPTextModel`), so diffusers' own
path runs; the edit reads the norm from either layout."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.steer.keylock import keylock_linear
from test_keylock import _concept_setup  # noqa: F401  (registers kv_recorder_test too)

PROMPT = "a red <flag> in the snow"


class LegacyLayoutCLIPTextModel(CLIPTextModel):
    """CLIPTextModel with transformers 4.x's ``text_model`` attribute (itself, flattened), which diffusers' clip_skip
    path reads."""

    @property
    def text_model(self):
        return self


def legacy_layout(pipe):
    """``pipe`` with its text encoder rebuilt as :class:`LegacyLayoutCLIPTextModel` (same weights)."""
    old = pipe.text_encoder
    if hasattr(old, "text_model"):  # transformers < 5.6: diffusers' path runs as is
        return pipe
    new = LegacyLayoutCLIPTextModel(old.config).eval()
    new.load_state_dict(old.state_dict())
    pipe.text_encoder = new
    return pipe


@pytest.fixture(scope="module")
def sd15():
    pipe = legacy_layout(tiny_pipeline("sd15"))
    con = cc.initial_concept(pipe, "<flag>", "fox", ["a {}", "a red {} in the snow"])
    g = torch.Generator().manual_seed(0)
    for t in con.values.values():
        t.add_(torch.randn(t.shape, generator=g))
    # a learned-looking embedding: the prompt's encoding differs from the superclass prompt's
    con.embedding = con.embedding + torch.randn(con.embedding.shape, generator=g)
    cov = cc.estimate_covariance(pipe, ["a red fox in the snow", "a fox", "the snow is white", "a red fox"])
    return pipe, con, cov


@pytest.fixture(scope="module")
def sdxl():
    return _concept_setup("sdxl", embedding_noise=0.5)


def _ids(tok, prompt, concept):
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    ids[ids == tok.convert_tokens_to_ids(concept.token)] = tok(concept.superclass, add_special_tokens=False).input_ids[0]
    return ids


@torch.no_grad()
def sd_superclass_by_hand(pipe, prompt, concept, clip_skip):
    """SD 1.x/2.x: the superclass prompt through the encoder as diffusers documents ``clip_skip`` (hidden state
    ``-(clip_skip + 1)`` through the final layer norm; without it, the last hidden state)."""
    out = pipe.text_encoder(_ids(pipe.tokenizer, prompt, concept), output_hidden_states=True)
    if clip_skip is None:
        return out.last_hidden_state[0]
    return pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])[0]


@torch.no_grad()
def sdxl_superclass_by_hand(pipe, prompt, concept, clip_skip):
    """SDXL: each encoder's hidden state ``-(clip_skip + 2)`` (penultimate without it), no layer norm, concatenated."""
    parts = [te(_ids(tok, prompt, concept), output_hidden_states=True).hidden_states[-((clip_skip or 0) + 2)]
             for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))]
    return torch.cat(parts, -1)[0]


def _heads(x, like):
    return x.view(x.shape[0], -1, like.shape[1], like.shape[-1]).transpose(1, 2)


def _check_keys(pipe, family, con, cov, clip_skip, by_hand):
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        kw = tiny_call_kwargs(family, prompt=PROMPT, num_inference_steps=1, height=64, width=64, clip_skip=clip_skip)
        pipe(**kw)
        seen = handle.method.base.seen
        assert len(seen) == len(cc.cross_attention_modules(pipe.unet))
        want_e = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                    clip_skip=clip_skip)[0]
        reference = by_hand(pipe, PROMPT, con, clip_skip)
        if clip_skip is not None:  # the layer matters: the reference is not the superclass prompt's default encoding
            assert (reference - by_hand(pipe, PROMPT, con, None)).abs().max() > 1e-2
        unet = dict(pipe.unet.named_modules())
        c_inv = torch.linalg.inv(cov).float()
        for name, e, k, v in seen:
            torch.testing.assert_close(e[-1:], want_e, rtol=0, atol=0)  # the context is the pipeline's clip_skip one
            attn = unet[name]
            ctx = torch.stack([e[0], reference])  # CFG [uncond, cond]: the uncond row has no concept, keeps its own
            want_k = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None], c_inv, 0.7,
                                    0.15)
            want_v = keylock_linear(e, attn.to_v.weight, None, con.i_star[None], con.values[name][None], c_inv, 0.7,
                                    0.15)
            torch.testing.assert_close(k, _heads(want_k, k), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, _heads(want_v, v), rtol=1e-5, atol=1e-5)  # values from the prompt itself
    finally:
        attnproc.remove(pipe)


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_global_locking_encodes_the_superclass_prompt_at_the_pipelines_clip_skip(sd15, clip_skip):
    pipe, con, cov = sd15
    _check_keys(pipe, "sd15", con, cov, clip_skip, sd_superclass_by_hand)


@pytest.mark.parametrize("clip_skip", [None, 1])  # the tiny encoders have 2 layers: SDXL's clip_skip 2 is out of range
def test_sdxl_global_locking_encodes_the_superclass_prompt_at_the_pipelines_clip_skip(sdxl, clip_skip):
    pipe, con, cov = sdxl
    _check_keys(pipe, "sdxl", con, cov, clip_skip, sdxl_superclass_by_hand)


def test_clip_skip_of_one_call_does_not_leak_into_the_next(sd15):
    """Calls with and without clip_skip on one handle: each call's keys come from its own layer."""
    pipe, con, cov = sd15
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        keys = {}
        for skip in (2, None):
            handle.method.base.seen.clear()
            pipe(**tiny_call_kwargs("sd15", prompt=PROMPT, num_inference_steps=1, height=64, width=64, clip_skip=skip))
            name, e, k, _ = handle.method.base.seen[0]
            attn = dict(pipe.unet.named_modules())[name]
            ctx = torch.stack([e[0], sd_superclass_by_hand(pipe, PROMPT, con, skip)])
            want = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None],
                                  torch.linalg.inv(cov).float(), 0.7, 0.15)
            torch.testing.assert_close(k, _heads(want, k), rtol=1e-5, atol=1e-5)
            keys[skip] = k
        assert (keys[2] - keys[None]).abs().max() > 1e-3
    finally:
        attnproc.remove(pipe)


def test_sdxl_negative_prompt_with_the_concept_is_locked_at_the_layer_diffusers_encodes_it(sdxl):
    """diffusers' SDXL encodes the negative prompt at the penultimate layer whatever the ``clip_skip``: a concept
    in it gets the superclass keys of that layer, the prompt those of the ``clip_skip`` layer."""
    pipe, con, cov = sdxl
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        pipe(**tiny_call_kwargs("sdxl", prompt=PROMPT, negative_prompt=PROMPT, num_inference_steps=1, height=64,
                                width=64, clip_skip=1))
        name, e, k, _ = handle.method.base.seen[0]
        attn = dict(pipe.unet.named_modules())[name]
        ctx = torch.stack([sdxl_superclass_by_hand(pipe, PROMPT, con, None), sdxl_superclass_by_hand(pipe, PROMPT, con, 1)])
        want = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None],
                              torch.linalg.inv(cov).float(), 0.7, 0.15)
        torch.testing.assert_close(k, _heads(want, k), rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)
