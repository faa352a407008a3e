"""Test-only ComfyUI nodes standing in for models too large to build here (copied into the test server's
custom_nodes by comfy_engine.py, and imported by it for :func:`tiny_clip`). Needs ComfyUI on the path."""
import json
import os
import tempfile

import torch


def tiny_clip(width: int = 64):
    """A real ``comfy.sd.CLIP`` with ComfyUI's SD1 tokenizer (its bundled CLIP vocabulary) and a 1-layer random
    text model of ``width`` channels: CLIPTextEncode and ``clip.tokenize`` work as with SD 1.5's."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        config = json.load(f)
    config.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=1,
                  projection_dim=width)
    path = os.path.join(tempfile.mkdtemp(prefix="attnproc_clip"), "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": path}
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    torch.manual_seed(4)
    init_weights(clip.cond_stage_model)  # norms at 1, the rest small and random
    return clip


def tiny_sdxl_clip(width_l: int = 32, width_g: int = 48):
    """A real ``comfy.sd.CLIP`` of SDXL's classes (``SDXLTokenizer``: clip_l and clip_g; ``SDXLClipModel``: both
    encoders' penultimate states concatenated, the pooled output from clip_g) with tiny 3-layer random text
    models, sized through ComfyUI's own per-encoder config options (``clip_l_model_config``/``clip_g_model_config``).
    Context width ``width_l + width_g``; pooled width ``width_g``."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    def small(width):
        return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
                "num_hidden_layers": 3, "projection_dim": width}

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "clip_l_model_config": small(width_l),
                                                       "clip_g_model_config": small(width_g)})
    torch.manual_seed(5)
    init_weights(clip.cond_stage_model)
    return clip


def init_weights(model: torch.nn.Module, std: float = 0.05, qk_std: float | None = None) -> None:
    """Random weights with the scales of a trained model where it matters: norms at 1 (not random signs near
    0), and optionally larger query/key projections (peaked attention)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif qk_std is not None and name.endswith(("to_q.weight", "to_k.weight")):
                p.normal_(0, qk_std)
            else:
                p.normal_(0, std)


def tiny_unet(cls: str = "SD15", **overrides):
    """A tiny UNet from ComfyUI's own classes (SD15 config, BaseModel, ModelPatcher by default); context width 64."""
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, cls)({
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "context_dim": 64, "num_head_channels": 16, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "legacy": False, "use_spatial_transformer": True, **overrides})
    torch.manual_seed(2)
    base = config.get_model({}, device=torch.device("cpu"))
    init_weights(base, qk_std=0.3)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


class AttnProcTestConditioning:
    """Random text conditioning of a given shape (Wan's umt5-xxl encoder has 5.7 B parameters)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 12}),
                             "width": ("INT", {"default": 4096})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {}]],)


class AttnProcTestClip:
    """:func:`tiny_clip` as a CLIP output (maskmod uses the CLIP's tokenizer to find phrases)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return (tiny_clip(),)


class AttnProcTestSD15:
    """A stand-in for CheckpointLoaderSimple with SD 1.5: :func:`tiny_unet` and :func:`tiny_clip` (no VAE: the
    runnable examples save latents)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return (tiny_unet(), tiny_clip(), None)


NODE_CLASS_MAPPINGS = {"AttnProcTestConditioning": AttnProcTestConditioning, "AttnProcTestClip": AttnProcTestClip,
                       "AttnProcTestSD15": AttnProcTestSD15}
