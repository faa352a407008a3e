"""A tiny SD 2.x-shaped diffusers pipeline (test helper; also imported by the ComfyUI engine script).

What makes it SD 2.x rather than SD 1.5: v-prediction, one OpenCLIP-style text encoder as diffusers loads
OpenCLIP-H (a ``CLIPTextModel`` with plain GELU whose last layer is already dropped, so its output, through the
final layer norm, is the penultimate layer: what ComfyUI's ``clip_h`` computes), the tokenizer padding with "!"
(id 0), linear projections in the transformers and 64 channels per attention head. Widths are scaled down: a
``width``-wide text context stands in for SD 2.x's 1024.
"""
from __future__ import annotations

import diffusers
import torch

from attnproc.pipelines import _tokenizers as tk
from attnproc.pipelines.tiny import _SD_BETAS, _clip_text, _vae_kl

SD2_WIDTH = 48  # the tiny text context (SD 2.x: 1024); the tiny SD 1.5 and SDXL contexts are 64 and 80 wide
CHANNELS = (64, 128)  # 64 channels per head, as SD 2.x (and ComfyUI's SD20 model class) fix it


def tiny_sd2_pipeline(tokenizer=None, width: int = SD2_WIDTH, seed: int = 0):
    """``StableDiffusionPipeline`` with tiny random weights laid out as SD 2.x (see the module docstring).
    ``tokenizer``: a CLIP tokenizer (default: the tiny in-memory one), given "!" as its pad token when it has it."""
    tokenizer = tk.clip_tokenizer() if tokenizer is None else tokenizer
    if "!" in tokenizer.get_vocab():
        tokenizer.pad_token = "!"
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        return _build(tokenizer, width, seed)


def _build(tokenizer, width: int, seed: int):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=CHANNELS, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=tuple(c // 64 for c in CHANNELS),  # diffusers' name for the number of heads
        cross_attention_dim=width, use_linear_projection=True)
    torch.manual_seed(seed)
    text_encoder = _clip_text(tokenizer, width, projection_dim=width)
    torch.manual_seed(seed)
    vae = _vae_kl(4, scaling_factor=0.18215)
    scheduler = diffusers.DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             image_encoder=None, requires_safety_checker=False)
    for part in (unet, text_encoder, vae):
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
