"""Tiny offline diffusers pipelines with random weights, one per supported model family.

Everything is built from small configs in memory (no hub, no files): real pipeline classes,
real model classes, tiny sizes. Meant for tests, the demo and benchmarks of the plumbing.

    pipe = tiny_pipeline("wan21", seed=0)
    video = pipe(**tiny_call_kwargs("wan21")).frames      # [1, 9, 3, 128, 128] (output_type="pt")

Guarantees (tests rely on them):

* same ``seed`` → bit-identical weights (``torch.manual_seed(seed)`` before each component);
* every component in eval mode, fp32, on CPU, progress bar disabled;
* ``save_pretrained`` → ``from_pretrained`` (the pipeline class or ``DiffusionPipeline``) loads
  offline and reproduces the output; tokenizers round-trip through ``tokenizer.json``;
* attention head dim ≥ 8, ≥ 2 transformer blocks, RoPE axis splits valid;
* :func:`tiny_call_kwargs` gives ≥ 8×8 visual tokens per (latent) frame after patchify and CFG on
  where the pipeline has it (Flux and HunyuanVideo: guidance-distilled, true CFG off).

Layouts at the default kwargs (VAE ÷8 spatially except LTX ÷32; video VAEs ÷4 in time, LTX ÷8):

=============  ===========  ========  ==============  ==========================================
family         pixels       patch     visual tokens   text
=============  ===========  ========  ==============  ==========================================
sd15 / sdxl    128²         none      16×16 and 8×8   cross-attention, 77 CLIP tokens (UNet)
sd3            128²         2         8×8             joint [img, txt]: 77 CLIP + 32 T5
flux           128²         2 (pack)  8×8             joint [txt, img]: 32 T5
wan21 / wan22  9 × 128²     1,2,2     3×8×8           cross-attention, 64 UMT5 (CFG: 2 calls)
hunyuanvideo   9 × 128²     1,2,2     3×8×8           joint [img, txt]: 32 Llama (after crop)
cogvideox      9 × 128²     2         3×8×8           joint [txt, img]: 32 T5 (CFG batch of 2)
ltx            17 × 256²    1,1,1     3×8×8           cross-attention, 32 T5 (CFG batch of 2)
qwenimage      128²         2 (pack)  8×8             joint [txt, img]: prompt-length Qwen tokens
=============  ===========  ========  ==============  ==========================================
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from . import _tokenizers as tk

FAMILIES: tuple[str, ...] = (
    "sd15",
    "sdxl",
    "sd3",
    "flux",
    "wan21",
    "wan22",
    "hunyuanvideo",
    "cogvideox",
    "ltx",
    "qwenimage",
)

PROMPT = "a red fox in the snow"

# Text length (T5/Llama/Qwen tokens) per family where the pipeline has `max_sequence_length`.
# CogVideoX's transformer is built with the same `max_text_seq_length`.
_MAX_SEQ = {
    "sd3": 32,
    "flux": 32,
    "wan21": 64,
    "wan22": 64,
    "hunyuanvideo": 32,
    "cogvideox": 32,
    "ltx": 32,
    "qwenimage": 32,
}

# Small text-encoder sizes shared by the families.
_CLIP_HIDDEN = 32
_T5_HIDDEN = 32


# ----------------------------------------------------------------------------- text encoders
def _clip_text(tokenizer, hidden: int = _CLIP_HIDDEN, projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _t5_config(tokenizer, cls_name: str = "T5Config"):
    import transformers

    return getattr(transformers, cls_name)(
        vocab_size=len(tokenizer),
        d_model=_T5_HIDDEN,
        d_kv=8,
        d_ff=2 * _T5_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer):
    from transformers import T5EncoderModel

    return T5EncoderModel(_t5_config(tokenizer))


def _umt5_encoder(tokenizer):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel(_t5_config(tokenizer, "UMT5Config"))


def _llama_encoder(tokenizer, hidden: int = 32):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # HunyuanVideo reads hidden_states[-3]
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaModel(config)


# ----------------------------------------------------------------------------- VAEs
def _vae_kl(latent_channels: int = 4, **extra):
    """AutoencoderKL with four levels (÷8 like the real SD/SDXL/SD3/Flux VAEs) and tiny channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=128,
        **extra,
    )


# ----------------------------------------------------------------------------- families
def _build_sd15(seed: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=_CLIP_HIDDEN,
        attention_head_dim=(2, 4),  # diffusers' UNet naming: this is the number of heads → head dim 16
    )
    torch.manual_seed(seed)
    vae = _vae_kl(4, scaling_factor=0.18215)
    tokenizer = tk.clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_text(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    hidden_1, hidden_2, proj_2, time_dim = 32, 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=hidden_1 + hidden_2,  # penultimate states of both encoders, concatenated
        attention_head_dim=(2, 4),  # number of heads (diffusers' UNet naming) → head dim 16
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=proj_2 + 6 * time_dim,  # pooled text_embeds + 6 time ids
    )
    torch.manual_seed(seed)
    vae = _vae_kl(4, scaling_factor=0.13025)
    tokenizer = tk.clip_tokenizer()
    tokenizer_2 = tk.clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_text(tokenizer, hidden_1)
    torch.manual_seed(seed + 1)
    text_encoder_2 = _clip_text(tokenizer_2, hidden_2, projection=True, projection_dim=proj_2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_hidden, clip_proj = 16, 16  # two CLIPs: 16 + 16 ≤ T5 width 32 (the joint width)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_proj,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed)
    vae = _vae_kl(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer, tokenizer_2, tokenizer_3 = tk.clip_tokenizer(), tk.clip_tokenizer(), tk.t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_text(tokenizer, clip_hidden, projection=True, projection_dim=clip_proj)
    torch.manual_seed(seed + 1)
    text_encoder_2 = _clip_text(tokenizer_2, clip_hidden, projection=True, projection_dim=clip_proj)
    torch.manual_seed(seed + 2)
    text_encoder_3 = _t5_encoder(tokenizer_3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2×2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    torch.manual_seed(seed)
    vae = _vae_kl(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer, tokenizer_2 = tk.clip_tokenizer(), tk.t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_text(tokenizer)
    torch.manual_seed(seed + 1)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE split t/h/w = 8/4/4
        in_channels=16,
        out_channels=16,
        text_dim=_T5_HIDDEN,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


# Wan 2.2 A14B's value: the high-noise expert (`transformer`) runs while t >= 875, the low-noise
# one (`transformer_2`) after. With shift 3 and 2 steps the timesteps are 1000 and 750: one each.
WAN22_BOUNDARY_RATIO = 0.875


def _build_wan(seed: int, two_experts: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    transformer = _wan_transformer()
    transformer_2 = None
    if two_experts:
        torch.manual_seed(seed + 1)
        transformer_2 = _wan_transformer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    tokenizer = tk.t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _umt5_encoder(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
    )


def _build_wan21(seed: int):
    return _build_wan(seed, two_experts=False)


def _build_wan22(seed: int):
    return _build_wan(seed, two_experts=True)


def _build_hunyuanvideo(seed: int):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=_CLIP_HIDDEN,
        rope_axes_dim=(4, 6, 6),  # sums to the head dim
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        norm_num_groups=2,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    tokenizer, tokenizer_2 = tk.llama_tokenizer(), tk.clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _llama_encoder(tokenizer, 32)
    torch.manual_seed(seed + 1)
    text_encoder_2 = _clip_text(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _build_cogvideox(seed: int):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE split t/h/w = 4/6/6
        in_channels=16,
        out_channels=16,
        time_embed_dim=32,
        text_embed_dim=_T5_HIDDEN,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=_MAX_SEQ["cogvideox"],
        use_rotary_positional_embeddings=True,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(4, 4, 4, 4),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=128,
        sample_width=128,
    )
    tokenizer = tk.t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(tokenizer)
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _build_ltx(seed: int):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    latent_channels = 8
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=_T5_HIDDEN,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=latent_channels,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    tokenizer = tk.t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _qwen25vl_encoder(tokenizer, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden // 4
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [head_dim // 4, head_dim // 8 * 1, head_dim // 2 - head_dim // 4 - head_dim // 8],
            },
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
            "window_size": 28,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_qwenimage(seed: int):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2×2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    tokenizer = tk.qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen25vl_encoder(tokenizer, 32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan21": _build_wan21,
    "wan22": _build_wan22,
    "hunyuanvideo": _build_hunyuanvideo,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "qwenimage": _build_qwenimage,
}


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return family


def tiny_pipeline(family: str, seed: int = 0):
    """A real diffusers pipeline of ``family`` with tiny random weights (fp32, CPU, eval mode).

    Same ``seed`` → identical weights. Unknown family → ``ValueError`` listing :data:`FAMILIES`.
    """
    builder = _BUILDERS[_check_family(family)]
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
        torch.set_default_dtype(torch.float32)
        try:
            pipe = builder(int(seed))
        finally:
            torch.set_default_dtype(previous)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built in fp32 on the CPU; modules from configs start in train mode
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- call kwargs


@functools.lru_cache(maxsize=None)
def hunyuan_prompt_template() -> dict:
    """HunyuanVideo's default prompt template with ``crop_start`` counted for the tiny tokenizer.

    (The pipeline's default ``crop_start=95`` is for the real Llama-3 tokenizer; with it the text
    tokens would be template text instead of the prompt.)
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    prefix = template.split("{}")[0]
    crop_start = len(tk.llama_tokenizer()(prefix)["input_ids"])
    return {"template": template, "crop_start": crop_start}


def tiny_call_kwargs(family: str, **overrides) -> dict:
    """Small, fast ``__call__`` kwargs for :func:`tiny_pipeline` ``(family)``; ``overrides`` replace keys.

    Visual tokens per latent frame after patchify are 8×8 for every family at the defaults.
    """
    _check_family(family)
    kw: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": 2,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "pt",
    }
    if family in ("sd15", "sdxl"):
        kw.update(height=128, width=128, guidance_scale=7.5 if family == "sd15" else 5.0)
    elif family == "sd3":
        kw.update(height=128, width=128, guidance_scale=7.0)
    elif family == "flux":
        kw.update(height=128, width=128, guidance_scale=3.5)  # guidance-distilled; true CFG off
    elif family in ("wan21", "wan22"):
        kw.update(height=128, width=128, num_frames=9, guidance_scale=5.0)
    elif family == "hunyuanvideo":
        kw.update(
            height=128, width=128, num_frames=9, guidance_scale=6.0, prompt_template=dict(hunyuan_prompt_template())
        )
    elif family == "cogvideox":
        kw.update(height=128, width=128, num_frames=9, guidance_scale=6.0, use_dynamic_cfg=False)
    elif family == "qwenimage":  # true CFG needs a negative prompt
        kw.update(height=128, width=128, true_cfg_scale=4.0, negative_prompt=" ")
    elif family == "ltx":
        kw.update(height=256, width=256, num_frames=17, guidance_scale=3.0, decode_timestep=0.0)
    if family in _MAX_SEQ:
        kw["max_sequence_length"] = _MAX_SEQ[family]
    kw.update(overrides)
    return kw
