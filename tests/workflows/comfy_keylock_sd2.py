"""The keylock nodes on SD 2.x inside the real ComfyUI engine (run by comfy_engine.py's ``steer`` section, in its
subprocess): a concept made by our diffusers path on the tiny SD 2.x-shaped pipeline (tests/steer/keylock_sd2.py,
with ComfyUI's own CLIP tokenizer) loads in the nodes on ComfyUI's SD20 model class (v-prediction) and its
``clip_h`` CLIP, both carrying the diffusers weights through ComfyUI's own key maps. Measurements go into
``results["keylock_sd2"]``; tests/workflows/test_comfy_steer.py asserts on them."""
import os
import sys

import torch

import nodes
from comfy_steer_engine import error_of, keylock_local_and_global, real_blocks, tiny_sdxl_unet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "steer"))
from keylock_sd2 import CHANNELS, SD2_WIDTH, tiny_sd2_pipeline  # noqa: E402

PROMPT = "a photo of embedding:sdtwo on the grass"  # ComfyUI's way to write the concept token
DIFFUSERS_PROMPT = "a photo of <sdtwo> on the grass"
SUPERCLASS_PROMPT = "a photo of star on the grass"


def comfy_sd2_clip(text_encoder):
    """ComfyUI's SD 2.x CLIP (``SD2Tokenizer``/``SD2ClipModel``: ``clip_h``, the penultimate layer through the final
    layer norm, padding with 0) sized by ComfyUI's ``clip_h_model_config`` option, with the diffusers encoder's
    weights. diffusers' OpenCLIP-H has its last layer dropped; ComfyUI's has it (one layer more, random here, never
    read: ComfyUI takes the layer before it)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip
    from comfy_test_nodes import init_weights

    config = text_encoder.config
    size = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers + 1,
            "projection_dim": config.hidden_size}
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer,
                                                    comfy.text_encoders.sd2_clip.SD2ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "clip_h_model_config": size})
    torch.manual_seed(8)
    init_weights(clip.cond_stage_model)
    weights = {"text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    missing, unexpected = clip.cond_stage_model.clip_h.transformer.load_state_dict(weights, strict=False)
    last = f"text_model.encoder.layers.{config.num_hidden_layers}."
    assert not unexpected and all(k.startswith(last) or k == "text_projection.weight" for k in missing), missing
    return clip


def comfy_sd2_model(unet):
    """ComfyUI's SD20 model class (v-prediction) with the diffusers UNet's weights loaded through ComfyUI's own
    diffusers key map (``comfy.utils.unet_to_diffusers``), every key of both sides matched."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config = comfy.supported_models.SD20({
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": CHANNELS[0], "num_res_blocks": [1, 1], "channel_mult": [c // CHANNELS[0] for c in CHANNELS],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "context_dim": unet.config.cross_attention_dim, "use_linear_in_transformer": True, "adm_in_channels": None,
        "use_temporal_attention": False, "legacy": False, "use_spatial_transformer": True})
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                      device=torch.device("cpu"))
    mapping = comfy.utils.unet_to_diffusers(config.unet_config)
    base.diffusion_model.load_state_dict({mapping[k]: v for k, v in unet.state_dict().items()}, strict=True)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def diffusers_concept(pipe, work):
    """The concept as our diffusers path makes it (``initial_concept``: the superclass's embedding, ``i*`` and
    o*_K, o*_V), made learned-looking (embedding and o*_V moved), with ``i*`` the token's own encoding in
    ``DIFFUSERS_PROMPT`` (sim = 1 there); saved, with the covariance of the pipeline's text encoder."""
    from attnproc.pipelines import concepts as cc

    concept = cc.initial_concept(pipe, "<sdtwo>", "star", ["a photo of a {}"])
    g = torch.Generator().manual_seed(9)
    concept.embedding = concept.embedding + 0.5 * torch.randn(concept.embedding.shape, generator=g)
    for t in concept.values.values():
        t.add_(torch.randn(t.shape, generator=g))
    cc.add_tokens(pipe, [concept])
    try:
        enc, ids = cc.encode_prompts(pipe, [DIFFUSERS_PROMPT])
        at = (ids[0] == pipe.tokenizer.convert_tokens_to_ids("<sdtwo>")).nonzero()[:, 0].tolist()
        concept.i_star = enc[0, at[0]].detach().float().clone()
        with torch.no_grad():
            encoded = pipe.encode_prompt(DIFFUSERS_PROMPT, "cpu", 1, False)[0][0]
    finally:
        cc.remove_tokens(pipe, ["<sdtwo>"])
    path = cc.save_concept(concept, os.path.join(work, "sdtwo.safetensors"))
    c = cc.estimate_covariance(pipe, ["a red fox in the snow", "a photo of a star", "the grass is green",
                                      "a star on the grass", "a photo of a cat"])
    cov = cc.save_covariance(c, os.path.join(work, "C.safetensors"), text_encoder=cc.text_fingerprint(pipe),
                             captions=5, ridge=1e-3)
    return concept, path, cov, torch.linalg.inv(c), at, encoded


def keylock_sd2_checks(results, tiny_unet, tiny_clip, diff, work):
    import comfy.sd1_clip
    import safetensors.torch
    from transformers import CLIPTokenizer

    from attnproc.workflows.comfy_steer import SUPERCLASS_KEY, concept_clip, concept_encode, patch_keylock

    work = os.path.join(work, "sd2")
    os.makedirs(work, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer"),
                                              model_max_length=77)  # as SD 2.x's tokenizer (ComfyUI's file: 8192)
    pipe = tiny_sd2_pipeline(tokenizer)  # ComfyUI's CLIP vocabulary, "!" padding: SD 2.x's tokenizer
    concept, path, cov, c_inv, at, diffusers_encoding = diffusers_concept(pipe, work)
    model, clip = comfy_sd2_model(pipe.unet), comfy_sd2_clip(pipe.text_encoder)
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 7, SD2_WIDTH, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        reference = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        unet_gap = diff(model.model.diffusion_model(x, timesteps=t, context=ctx), reference)
    cclip = concept_clip(clip, [concept], folder=work)
    tokens = cclip.tokenize(PROMPT)
    folder = os.path.join(work, "attnproc_concepts")
    stored = safetensors.torch.load_file(os.path.join(folder, os.listdir(folder)[0], "sdtwo.safetensors"))
    (positive,) = nodes.CLIPTextEncode().encode(cclip, PROMPT)
    (negative,) = nodes.CLIPTextEncode().encode(cclip, "")
    r = {"model_class": type(model.model).__name__, "model_type": model.model.model_type.name,
         "unet_vs_diffusers": unet_gap, "unet_scale": float(reference.abs().max()),
         "embedding_file_keys": sorted(stored), "context_width": int(concept.i_star.numel()),
         "embedding_positions": [i for i, tok in enumerate(tokens["h"][0]) if torch.is_tensor(tok[0])],
         "diffusers_position": at, "concept_has_model_fingerprint": bool(concept.model), "row_is_the_concepts": torch.equal(stored["clip_h"][0], concept.embedding.float()),
         "encode_vs_diffusers": diff(positive[0][0][0], diffusers_encoding)}
    r["local"], r["global"] = keylock_local_and_global(model, clip, cclip, concept, path, cov, c_inv, at, diff,
                                                       positive, negative, PROMPT, SUPERCLASS_PROMPT)
    # CLIPSetLastLayer: the encode node's superclass encoding follows the CLIP's layer as its prompt does
    (early,) = nodes.CLIPSetLastLayer().set_last_layer(clip, -3)
    carried = concept_encode(early, str(path), PROMPT)
    (early_reference,) = nodes.CLIPTextEncode().encode(early, SUPERCLASS_PROMPT)
    (default_reference,) = nodes.CLIPTextEncode().encode(clip, SUPERCLASS_PROMPT)
    (early_prompt,) = nodes.CLIPTextEncode().encode(concept_clip(early, [concept], folder=work), PROMPT)
    superclass = carried[0][1]["model_conds"][SUPERCLASS_KEY].cond
    r["last_layer"] = {"encode_vs_clip_text_encode": diff(carried[0][0], early_prompt[0][0]),
                       "prompt_vs_default_layer": diff(carried[0][0], positive[0][0]),
                       "superclass_vs_clip_text_encode": diff(superclass, early_reference[0][0]),
                       "superclass_vs_default_layer": diff(superclass, default_reference[0][0])}
    # SD 1.5 and SDXL concepts (made by the earlier sections) on SD 2.x, and the SD 2.x concept on SD 1.5 and SDXL
    sd15, sdxl = tiny_unet(), tiny_sdxl_unet(tiny_unet, 80)
    parent = os.path.dirname(work)
    sd15_path, sd15_cov = os.path.join(parent, "tri15.safetensors"), os.path.join(parent, "C.safetensors")
    sdxl_path, sdxl_cov = os.path.join(parent, "sdxl", "sdxltri.safetensors"), os.path.join(parent, "sdxl", "C.safetensors")
    r["errors"] = {"sd15_on_sd2": error_of(patch_keylock, model, sd15_path, sd15_cov),
                   "sdxl_on_sd2": error_of(patch_keylock, model, sdxl_path, sdxl_cov),
                   "sd2_on_sd15": error_of(patch_keylock, sd15, str(path), str(cov)),
                   "sd2_on_sdxl": error_of(patch_keylock, sdxl, str(path), str(cov)),
                   "sd15_on_sd2_clip": error_of(concept_clip, clip, sd15_path, folder=work),
                   "sd2_on_sd15_clip": error_of(concept_encode, tiny_clip(64), str(path), PROMPT),
                   "models_untouched": all("patches_replace" not in m.model_options.get("transformer_options", {})
                                           for m in (model, sd15, sdxl))}
    r["real_sd2"] = real_sd2_blocks()
    results["keylock_sd2"] = r


def real_sd2_blocks() -> dict:
    """SD 2.1 at its real size (meta device): diffusers' 16 ``attn2`` onto ComfyUI's SD20 UNet."""
    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
              "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
              "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
              "context_dim": 1024, "num_head_channels": 64,
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
              "use_temporal_attention": False, "use_temporal_resblock": False}  # ComfyUI's SD20 (model_detection)
    unet = dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=1024,
                use_linear_projection=True)  # stabilityai/stable-diffusion-2-1's unet/config.json
    return real_blocks("SD20", config, unet, embedding=1024)
