"""Tiny offline diffusers pipelines with random weights, one per supported model family.

Everything is built from small configs in memory (no hub, no files): real pipeline classes,
real model classes, tiny sizes. Meant for tests, the demo and benchmarks of the plumbing.

    pipe = tiny_pipeline("wan21", seed=0)
    video = pipe(**tiny_call_kwargs("wan21")).frames      # [1, 9, 3, 128, 128] (output_type="pt")

Each tiny pipeline is one :class:`TinyPipeline` record in :data:`TINY_PIPELINES` (name, attnproc family,
diffusers pipeline class, components builder, call kwargs), in the spirit of diffusers'
``get_dummy_components``/``get_dummy_inputs``. A name (``"wan21"``) or a family word (``"wan"``, ``"unet"``:
the first tiny pipeline of that family) selects one.

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
name           pixels       patch     visual tokens   text
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
from dataclasses import dataclass, field
from typing import Any, Callable

import diffusers
import torch

from attnproc.errors import UnsupportedFamilyError
from attnproc.families import family_named

from . import _tokenizers as tk

PROMPT = "a red fox in the snow"

# Small text-encoder sizes shared by the pipelines.
_CLIP_HIDDEN = 32
_T5_HIDDEN = 32


def _seeded(seed: int, make: Callable, *args, **kwargs):
    """``make(*args, **kwargs)`` right after ``torch.manual_seed(seed)``: each model's weights depend on the seed
    alone, not on what was built before it."""
    torch.manual_seed(seed)
    return make(*args, **kwargs)


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


# ----------------------------------------------------------------------------- components per pipeline
_UNET_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=(2, 4))  # diffusers' UNet naming: the number of heads → head dim 16
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sd15(seed: int) -> dict:
    tokenizer = tk.clip_tokenizer()
    return dict(
        unet=_seeded(seed, diffusers.UNet2DConditionModel, **_UNET_COMMON, cross_attention_dim=_CLIP_HIDDEN),
        vae=_seeded(seed, _vae_kl, 4, scaling_factor=0.18215),
        text_encoder=_seeded(seed, _clip_text, tokenizer), tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def _sdxl(seed: int) -> dict:
    hidden_1, hidden_2, proj_2, time_dim = 32, 32, 32, 8
    tokenizer, tokenizer_2 = tk.clip_tokenizer(), tk.clip_tokenizer()
    unet = _seeded(seed, diffusers.UNet2DConditionModel, **_UNET_COMMON, transformer_layers_per_block=(1, 2),
                   cross_attention_dim=hidden_1 + hidden_2,  # penultimate states of both encoders, concatenated
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                   projection_class_embeddings_input_dim=proj_2 + 6 * time_dim)  # pooled text_embeds + 6 time ids
    return dict(
        unet=unet, vae=_seeded(seed, _vae_kl, 4, scaling_factor=0.13025),
        text_encoder=_seeded(seed, _clip_text, tokenizer, hidden_1),
        text_encoder_2=_seeded(seed + 1, _clip_text, tokenizer_2, hidden_2, projection=True, projection_dim=proj_2),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=diffusers.EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)


def _sd3(seed: int) -> dict:
    clip_hidden, clip_proj = 16, 16  # two CLIPs: 16 + 16 ≤ T5 width 32 (the joint width)
    tokenizer, tokenizer_2, tokenizer_3 = tk.clip_tokenizer(), tk.clip_tokenizer(), tk.t5_tokenizer()
    transformer = _seeded(seed, diffusers.SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=16,
                          out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=_T5_HIDDEN, caption_projection_dim=32,
                          pooled_projection_dim=2 * clip_proj, pos_embed_max_size=32)
    return dict(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(seed, _vae_kl, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False),
        text_encoder=_seeded(seed, _clip_text, tokenizer, clip_hidden, projection=True, projection_dim=clip_proj),
        text_encoder_2=_seeded(seed + 1, _clip_text, tokenizer_2, clip_hidden, projection=True,
                               projection_dim=clip_proj),
        text_encoder_3=_seeded(seed + 2, _t5_encoder, tokenizer_3),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3)


def _flux(seed: int) -> dict:
    tokenizer, tokenizer_2 = tk.clip_tokenizer(), tk.t5_tokenizer()
    transformer = _seeded(seed, diffusers.FluxTransformer2DModel, patch_size=1,
                          in_channels=64,  # 16 latent channels packed 2×2
                          num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=_T5_HIDDEN, pooled_projection_dim=_CLIP_HIDDEN, guidance_embeds=True,
                          axes_dims_rope=(4, 6, 6))  # sums to the head dim
    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                            max_shift=1.15, base_image_seq_len=256,
                                                            max_image_seq_len=4096),
        vae=_seeded(seed, _vae_kl, 16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False),
        text_encoder=_seeded(seed, _clip_text, tokenizer), tokenizer=tokenizer,
        text_encoder_2=_seeded(seed + 1, _t5_encoder, tokenizer_2), tokenizer_2=tokenizer_2,
        transformer=transformer, image_encoder=None, feature_extractor=None)


def _wan_transformer(seed: int):
    return _seeded(seed, diffusers.WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2,
                   attention_head_dim=16,  # RoPE split t/h/w = 8/4/4
                   in_channels=16, out_channels=16, text_dim=_T5_HIDDEN, freq_dim=32, ffn_dim=64, num_layers=2,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


# Wan 2.2 A14B's value: the high-noise expert (`transformer`) runs while t >= 875, the low-noise
# one (`transformer_2`) after. With shift 3 and 2 steps the timesteps are 1000 and 750: one each.
WAN22_BOUNDARY_RATIO = 0.875


def _wan(seed: int, two_experts: bool = False) -> dict:
    tokenizer = tk.t5_tokenizer()
    return dict(
        tokenizer=tokenizer, text_encoder=_seeded(seed, _umt5_encoder, tokenizer),
        vae=_seeded(seed, diffusers.AutoencoderKLWan, base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True]),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_wan_transformer(seed),
        transformer_2=_wan_transformer(seed + 1) if two_experts else None,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None)


def _hunyuanvideo(seed: int) -> dict:
    tokenizer, tokenizer_2 = tk.llama_tokenizer(), tk.clip_tokenizer()
    transformer = _seeded(seed, diffusers.HunyuanVideoTransformer3DModel, in_channels=16, out_channels=16,
                          num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
                          num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                          guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=_CLIP_HIDDEN,
                          rope_axes_dim=(4, 6, 6))  # sums to the head dim
    vae = _seeded(seed, diffusers.AutoencoderKLHunyuanVideo, in_channels=3, out_channels=3, latent_channels=16,
                  block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                  spatial_compression_ratio=8, temporal_compression_ratio=4)
    return dict(
        text_encoder=_seeded(seed, _llama_encoder, tokenizer, 32), tokenizer=tokenizer, transformer=transformer,
        vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_seeded(seed + 1, _clip_text, tokenizer_2), tokenizer_2=tokenizer_2)


_COGVIDEOX_TEXT = 32  # the transformer's max_text_seq_length = the pipeline's max_sequence_length


def _cogvideox(seed: int) -> dict:
    tokenizer = tk.t5_tokenizer()
    transformer = _seeded(seed, diffusers.CogVideoXTransformer3DModel, num_attention_heads=2,
                          attention_head_dim=16,  # RoPE split t/h/w = 4/6/6
                          in_channels=16, out_channels=16, time_embed_dim=32, text_embed_dim=_T5_HIDDEN,
                          num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
                          temporal_compression_ratio=4, max_text_seq_length=_COGVIDEOX_TEXT,
                          use_rotary_positional_embeddings=True)
    vae = _seeded(seed, diffusers.AutoencoderKLCogVideoX, block_out_channels=(4, 4, 4, 4), latent_channels=16,
                  layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_height=128,
                  sample_width=128)
    scheduler = diffusers.CogVideoXDDIMScheduler(
        **_SD_BETAS, clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=1.0, timestep_spacing="trailing")
    return dict(tokenizer=tokenizer, text_encoder=_seeded(seed, _t5_encoder, tokenizer), vae=vae,
                transformer=transformer, scheduler=scheduler)


def _ltx(seed: int) -> dict:
    latent_channels = 8
    tokenizer = tk.t5_tokenizer()
    transformer = _seeded(seed, diffusers.LTXVideoTransformer3DModel, in_channels=latent_channels,
                          out_channels=latent_channels, patch_size=1, patch_size_t=1, num_attention_heads=2,
                          attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=_T5_HIDDEN)
    vae = _seeded(seed, diffusers.AutoencoderKLLTXVideo, latent_channels=latent_channels,
                  block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                  spatio_temporal_scaling=(True, True, True, False),
                  decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=4, patch_size_t=1,
                  encoder_causal=True, decoder_causal=False)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                          base_image_seq_len=1024, max_image_seq_len=4096,
                                                          shift_terminal=0.1)
    return dict(scheduler=scheduler, vae=vae, text_encoder=_seeded(seed, _t5_encoder, tokenizer),
                tokenizer=tokenizer, transformer=transformer)


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


def _qwenimage(seed: int) -> dict:
    tokenizer = tk.qwen2_tokenizer()
    transformer = _seeded(seed, diffusers.QwenImageTransformer2DModel, patch_size=2,
                          in_channels=64,  # 16 latent channels packed 2×2
                          out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=32, axes_dims_rope=(4, 6, 6))  # sums to the head dim
    vae = _seeded(seed, diffusers.AutoencoderKLQwenImage, base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1],
                  num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return dict(scheduler=scheduler, vae=vae, text_encoder=_seeded(seed, _qwen25vl_encoder, tokenizer, 32),
                tokenizer=tokenizer, transformer=transformer)


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


# ----------------------------------------------------------------------------- the records
@dataclass(frozen=True)
class TinyPipeline:
    """One tiny pipeline: ``name`` (what users type), ``family`` (attnproc's family name), ``pipeline`` (the
    diffusers class), ``components(seed)`` (its ``__init__`` kwargs, every model seeded on its own), ``call``
    (its ``__call__`` kwargs beyond prompt / steps / generator / output type; a callable for values computed
    on demand) and ``max_sequence_length`` (text tokens, where the pipeline takes it)."""

    name: str
    family: str
    pipeline: str
    components: Callable[[int], dict[str, Any]]
    call: dict[str, Any] | Callable[[], dict[str, Any]] = field(default_factory=dict)
    max_sequence_length: int | None = None

    def build(self, seed: int = 0):
        """The pipeline with tiny random weights (fp32, CPU, eval mode, no progress bar); the caller's global
        RNG state is left as it was."""
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.set_default_dtype(torch.float32)
            try:
                pipe = getattr(diffusers, self.pipeline)(**self.components(int(seed)))
            finally:
                torch.set_default_dtype(previous)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # built in fp32 on the CPU; modules from configs start in train mode
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, **overrides) -> dict[str, Any]:
        """Small, fast ``__call__`` kwargs (a fresh generator seeded at 0 each time); ``overrides`` replace keys."""
        kw: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": 2,
                              "generator": torch.Generator().manual_seed(0), "output_type": "pt"}
        kw.update(self.call() if callable(self.call) else self.call)
        if self.max_sequence_length is not None:
            kw["max_sequence_length"] = self.max_sequence_length
        kw.update(overrides)
        return kw


_IMAGE = dict(height=128, width=128)
_VIDEO = dict(height=128, width=128, num_frames=9)

TINY_PIPELINES: dict[str, TinyPipeline] = {r.name: r for r in [
    TinyPipeline("sd15", "unet", "StableDiffusionPipeline", _sd15, dict(_IMAGE, guidance_scale=7.5)),
    TinyPipeline("sdxl", "unet", "StableDiffusionXLPipeline", _sdxl, dict(_IMAGE, guidance_scale=5.0)),
    TinyPipeline("sd3", "sd3", "StableDiffusion3Pipeline", _sd3, dict(_IMAGE, guidance_scale=7.0), 32),
    TinyPipeline("flux", "flux", "FluxPipeline", _flux,
                 dict(_IMAGE, guidance_scale=3.5), 32),  # guidance-distilled; true CFG off
    TinyPipeline("wan21", "wan", "WanPipeline", _wan, dict(_VIDEO, guidance_scale=5.0), 64),
    TinyPipeline("wan22", "wan", "WanPipeline", functools.partial(_wan, two_experts=True),
                 dict(_VIDEO, guidance_scale=5.0), 64),
    TinyPipeline("hunyuanvideo", "hunyuanvideo", "HunyuanVideoPipeline", _hunyuanvideo,
                 lambda: dict(_VIDEO, guidance_scale=6.0, prompt_template=dict(hunyuan_prompt_template())), 32),
    TinyPipeline("cogvideox", "cogvideox", "CogVideoXPipeline", _cogvideox,
                 dict(_VIDEO, guidance_scale=6.0, use_dynamic_cfg=False), _COGVIDEOX_TEXT),
    TinyPipeline("ltx", "ltx", "LTXPipeline", _ltx,
                 dict(height=256, width=256, num_frames=17, guidance_scale=3.0, decode_timestep=0.0), 32),
    TinyPipeline("qwenimage", "qwenimage", "QwenImagePipeline", _qwenimage,
                 dict(_IMAGE, true_cfg_scale=4.0, negative_prompt=" "), 32),  # true CFG needs a negative prompt
]}
NAMES: tuple[str, ...] = tuple(TINY_PIPELINES)
FAMILIES = NAMES  # deprecated: these are tiny pipeline names, not attnproc families; use NAMES


def tiny_record(name: str) -> TinyPipeline:
    """The record a word names: a tiny pipeline's name, or a family word (``"wan"``, ``"unet"``, an alias) for
    the first tiny pipeline of that family."""
    if name in TINY_PIPELINES:
        return TINY_PIPELINES[name]
    try:
        family = family_named(name).name
    except UnsupportedFamilyError:
        family = None
    found = next((r for r in TINY_PIPELINES.values() if r.family == family), None)
    if found is None:
        valid = ", ".join(f"{r.name} (family {r.family})" for r in TINY_PIPELINES.values())
        raise ValueError(f"unknown tiny pipeline {name!r}; valid: {valid}")
    return found


def tiny_pipeline(name: str, seed: int = 0):
    """A real diffusers pipeline with tiny random weights (fp32, CPU, eval mode); see :class:`TinyPipeline`.

    Same ``seed`` → identical weights. Unknown name → ``ValueError`` listing :data:`NAMES`.
    """
    return tiny_record(name).build(seed)


def tiny_call_kwargs(name: str, **overrides) -> dict:
    """Small, fast ``__call__`` kwargs for :func:`tiny_pipeline` ``(name)``; ``overrides`` replace keys.

    Visual tokens per latent frame after patchify are 8×8 for every pipeline at the defaults.
    """
    return tiny_record(name).call_kwargs(**overrides)
