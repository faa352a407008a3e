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
    with torch.no_grad():  # norms at 1, the rest small and random
        for name, p in clip.cond_stage_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.05)
    return clip


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


NODE_CLASS_MAPPINGS = {"AttnProcTestConditioning": AttnProcTestConditioning, "AttnProcTestClip": AttnProcTestClip}
