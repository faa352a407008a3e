"""Training recipe of the shapes pipelines: ``python -m attnproc.pipelines.shapes train KIND``.

Two stages per model, both deterministic from ``--seed`` and resumable:

1. the VAE alone on dataset pixels (MSE + a small KL), then its latent statistics are written
   into its config (scaling/shift factors, Wan's per-channel mean/std);
2. the denoiser and the text encoder(s) jointly, VAE frozen: v-prediction on a cosine schedule
   for the SD 1.5 UNet, flow matching (target noise − x0) for the Flux and Wan transformers;
   10 % of captions dropped for classifier-free guidance; an EMA of the weights is what ships.

Batch ``i`` is always dataset seeds ``[i·B, (i+1)·B)`` and noise from ``Generator(seed, i)``, so
a run resumed from a checkpoint continues exactly. Checkpoints (``--work``) are single
safetensors files written atomically every ``--ckpt-every`` steps; each also exports the EMA
pipeline (fp16) to ``--out`` (default: the packaged model folder), so a partial run is usable.

    python -m attnproc.pipelines.shapes train wan21   # its recipe (each kind's defaults in SPECS)
    python -m attnproc.pipelines.shapes train flux --threads 2 --out /tmp/flux   # ~45 min on two idle cores
    python -m attnproc.pipelines.shapes train sd15 --steps 4000 --batch 32 --out /tmp/sd15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import _tokenizers as tk
from .shapes import BACKGROUND, WORDS, batch

MODELS_DIR = Path(__file__).parent / "shapes_models"


@dataclass(frozen=True)
class Spec:
    size: int  # pixels
    frames: int
    max_shapes: int
    max_seq: int  # text tokens where the pipeline takes max_sequence_length
    shift: float  # flow-matching shift (flux, wan21); unused by sd15
    lr: float
    # the recipe: what ``train KIND`` runs with no options (sd15, wan21: their shipped runs; flux: the 45-minute
    # recipe, its shipped model being a longer run, docs/shapes.md *Time*)
    steps: int = 3000
    batch: int = 16
    cooldown: int = 0  # last denoiser steps over which the rate falls linearly to 0
    # flow-matching training times before the shift: "uniform" u ~ U(0, 1), or "logit_normal" u = sigmoid(N(0, 1))
    # (SD3's choice: fewer samples at the ends, where the target is nearly pure noise or pure image)
    timesteps: str = "uniform"
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    # extra VAE loss weight on shape pixels: small shapes on a plain background are a few % of the
    # pixels, so a plain MSE learns the background first and the shapes' colour late
    vae_fg: float = 0.0
    vae_warmup: int = 0  # VAE steps over which its rate rises linearly (0: none, as the image recipes were trained)


WAN_STEPS, WAN_VAE_STEPS, FG_WEIGHT = 10400, 400, 10.0
SPECS: dict[str, Spec] = {
    "sd15": Spec(size=64, frames=1, max_shapes=3, max_seq=77, shift=1.0, lr=1e-3, steps=16000, vae_steps=200),
    "flux": Spec(size=64, frames=1, max_shapes=3, max_seq=16, shift=2.0, lr=1e-3, steps=9000, batch=32,
                 cooldown=3000, timesteps="logit_normal", vae_steps=200),
    "wan21": Spec(size=32, frames=17, max_shapes=1, max_seq=16, shift=2.0, lr=5e-4, steps=WAN_STEPS,
                   vae_steps=WAN_VAE_STEPS, vae_batch=4, vae_lr=3e-3, vae_fg=FG_WEIGHT,
                   vae_warmup=50),
}
TEXT_WIDTH = 64


def check_kind(kind: str) -> str:
    if kind not in SPECS:
        raise ValueError(f"kind must be one of {sorted(SPECS)}, got {kind!r}")
    return kind


# ----------------------------------------------------------------------------- architectures
def _clip(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_WIDTH,
    ))


def _t5(tokenizer, cls_name: str):
    import transformers

    config = getattr(transformers, cls_name + "Config")(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=16, d_ff=2 * TEXT_WIDTH, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return getattr(transformers, cls_name + "EncoderModel")(config)


def _image_vae():
    from diffusers import AutoencoderKL

    # ÷4: 64² pixels → 16² latents of 4 channels
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=64, mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0,
    )


def build(kind: str, seed: int = 0):
    """The untrained pipeline of ``kind`` (random init from ``seed``)."""
    from diffusers import (
        AutoencoderKLWan, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
        FluxTransformer2DModel, StableDiffusionPipeline, WanPipeline, WanTransformer3DModel,
    )

    spec = SPECS[check_kind(kind)]
    torch.manual_seed(seed)
    if kind == "sd15":
        tokenizer = tk.clip_tokenizer(words=WORDS)
        unet = _sd15_unet()
        scheduler = DDIMScheduler(
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
            set_alpha_to_one=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
        )
        return StableDiffusionPipeline(
            vae=_image_vae(), text_encoder=_clip(tokenizer), tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=spec.shift)
    if kind == "flux":
        tokenizer, tokenizer_2 = tk.clip_tokenizer(words=WORDS), tk.t5_tokenizer(words=WORDS)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=False, axes_dims_rope=(8, 12, 12),
        )
        vae = _image_vae()  # draws from the generator as always (the encoders' init after it is unchanged), then
        vae.load_state_dict(_sd15_vae_init(seed))  # starts where sd15's does, so the recipe trains sd15's VAE
        return FluxPipeline(
            scheduler=scheduler, vae=vae, text_encoder=_clip(tokenizer), tokenizer=tokenizer,
            text_encoder_2=_t5(tokenizer_2, "T5"), tokenizer_2=tokenizer_2, transformer=transformer,
            image_encoder=None, feature_extractor=None,
        )
    z = 8
    tokenizer = tk.t5_tokenizer(words=WORDS)
    # ÷4 in space, ÷2 in time: 17 × 32² pixels → 9 × 8² latents → 9 × 4 × 4 tokens
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
        scale_factor_temporal=2, scale_factor_spatial=4,  # WanPipeline sizes its latents by these
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=z,
        out_channels=z, text_dim=TEXT_WIDTH, freq_dim=64, ffn_dim=128, num_layers=3,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=_t5(tokenizer, "UMT5"), vae=vae, scheduler=scheduler,
        transformer=transformer,
    )


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        # text and self-attention at 8² and in the 4² mid block (at 16² it costs 1.6× the time)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 4, 4),
    )


def _sd15_vae_init(seed: int) -> dict:
    """sd15's untrained VAE weights for ``seed`` (``build`` draws its UNet, then its VAE). flux shares sd15's VAE
    (one image world, one latent space); from flux's own init, the same 200 steps reconstruct count right in
    72 % of held-out images against 100 %."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        _sd15_unet()
        return _image_vae().state_dict()


# ----------------------------------------------------------------------------- data → latents
def _pixels(kind: str, step: int, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    spec = SPECS[kind]
    seeds = np.arange(step * n, (step + 1) * n) + seed * 10_000_000
    pix, captions = batch(seeds, spec.size, spec.frames, spec.max_shapes)
    x = torch.from_numpy(pix)  # [B, F, 3, H, W]
    if kind == "wan21":
        return x.permute(0, 2, 1, 3, 4).contiguous(), captions  # [B, 3, F, H, W]
    return x[:, 0], captions


def _encode(pipe, kind: str, x: torch.Tensor) -> torch.Tensor:
    """Pixels → the normalised latents the denoiser sees (the inverse of the pipeline's decode)."""
    cfg = pipe.vae.config
    z = pipe.vae.encode(x).latent_dist.mode()
    if kind == "wan21":
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        return (z - mean) / std
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def _set_latent_stats(pipe, kind: str, seed: int) -> None:
    """Write the latent statistics of 64 dataset samples into the VAE config."""
    x, _ = _pixels(kind, 10**5, 32 if kind == "wan21" else 64, seed)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
    if kind == "wan21":
        dims = (0, 2, 3, 4)
        pipe.vae.register_to_config(latents_mean=z.mean(dims).tolist(), latents_std=z.std(dims).tolist())
    elif kind == "flux":
        pipe.vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    else:
        pipe.vae.register_to_config(scaling_factor=float(1 / z.std()))


# ----------------------------------------------------------------------------- checkpoints
def recipe_record(modules: dict, **options) -> dict:
    """What a checkpoint must have been trained with to be resumed: ``options`` (not the step count or cool-down,
    which a resumed run may extend) and a digest of the modules' initial weights (the seed and the code's init)."""
    from .concepts import _digest

    return {**options, "init": _digest(sorted(_flat(modules).items()))}


def _save_ckpt(path: Path, modules: dict, ema: dict, opt, step: int, recipe: dict) -> None:
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in _flat(modules).items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
    for i, st in enumerate(opt.state_dict()["state"].values()):
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "recipe": json.dumps(recipe, sort_keys=True)})
    os.replace(tmp, path)


def _load_ckpt(path: Path, modules: dict, ema: dict, opt, recipe: dict) -> int:
    """Resume from ``path``; refused (nothing loaded) when it was trained with another :func:`recipe_record`
    (files written before the record existed load unchecked)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    step = int(meta["step"])
    if "recipe" in meta:
        saved = json.loads(meta["recipe"])
        diff = [f"{k} {saved.get(k)!r} -> {recipe.get(k)!r}" for k in sorted(set(saved) | set(recipe))
                if saved.get(k) != recipe.get(k)]
        if diff:
            raise ValueError(f"{path} was trained with another recipe ({'; '.join(diff)}); "
                             f"use another --work folder, or delete it to start over")
    tensors = load_file(str(path))
    for name, mod in modules.items():
        mod.load_state_dict({k[len(f"model.{name}."):]: v for k, v in tensors.items()
                             if k.startswith(f"model.{name}.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    state = opt.state_dict()
    for i, pid in enumerate(state["param_groups"][0]["params"]):
        keys = [k for k in tensors if k.startswith(f"opt.{i}.")]
        if keys:
            state["state"][pid] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    opt.load_state_dict(state)
    return step


def _flat(modules: dict) -> dict:
    return {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}


def export(pipe, out: Path) -> None:
    """Save ``pipe`` in fp16 to ``out`` (a diffusers folder), replacing it atomically."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        pipe.to(torch.float32)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- stage 1: VAE
def train_vae(pipe, kind: str, steps: int, batch_size: int, seed: int, work: Path) -> None:
    ckpt = work / "vae.safetensors"
    spec = SPECS[kind]
    vae = pipe.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    modules = {"vae": vae}
    recipe = recipe_record(modules, seed=seed, batch=batch_size, lr=spec.vae_lr, fg=spec.vae_fg)
    start = _load_ckpt(ckpt, modules, {}, opt, recipe) if ckpt.exists() else 0
    bar = tqdm(range(start, steps), desc=f"{kind} vae", initial=start, total=steps, mininterval=10)
    for step in bar:
        x, _ = _pixels(kind, step, batch_size, seed + 1)  # whole clips: on 9 frames the Wan VAE drifts on frames 9-16
        torch.manual_seed(seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = _weighted_mse(rec, x, spec.vae_fg) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        if spec.vae_warmup:  # wan21's higher rate rises over its first steps
            for g in opt.param_groups:
                g["lr"] = spec.vae_lr * min(1.0, (step + 1) / spec.vae_warmup)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            _save_ckpt(ckpt, modules, {}, opt, step + 1, recipe)
    vae.eval()


def _weighted_mse(rec: torch.Tensor, x: torch.Tensor, fg: float) -> torch.Tensor:
    """MSE with weight ``1 + fg`` on shape pixels (those off the plain background), normalised."""
    if not fg:
        return torch.nn.functional.mse_loss(rec, x)
    bg = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, *([1] * (x.dim() - 2))) / 127.5 - 1
    w = 1 + fg * ((x - bg).abs().amax(1, keepdim=True) > 0.05).to(x.dtype)
    return ((rec - x) ** 2 * w).mean() / w.mean()


# ----------------------------------------------------------------------------- stage 2: denoiser
def _text(pipe, kind: str, prompts: list[str]):
    """Text conditioning through the pipeline's own encoder code, so training matches inference."""
    spec = SPECS[kind]
    if kind == "sd15":
        return {"encoder_hidden_states": pipe.encode_prompt(prompts, "cpu", 1, False)[0]}
    if kind == "flux":
        emb, pooled, txt_ids = pipe.encode_prompt(prompts, None, max_sequence_length=spec.max_seq)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": txt_ids}
    emb, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=spec.max_seq)
    return {"encoder_hidden_states": emb}


TIMESTEPS = ("uniform", "logit_normal")


def sample_u(n: int, gen: torch.Generator, timesteps: str) -> torch.Tensor:
    """``n`` flow-matching training times in (0, 1), before the shift (:attr:`Spec.timesteps`)."""
    if timesteps == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


def _loss(pipe, kind: str, x0: torch.Tensor, cond: dict, gen: torch.Generator,
          timesteps: str = "uniform") -> torch.Tensor:
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if kind == "sd15":
        sched = pipe.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        pred = pipe.unet(xt, t, **cond).sample
        return torch.nn.functional.mse_loss(pred, sched.get_velocity(x0, noise, t))
    u = sample_u(b, gen, timesteps)
    shift = SPECS[kind].shift
    sigma = shift * u / (1 + (shift - 1) * u)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - s) * x0 + s * noise
    target = noise - x0
    if kind == "flux":
        _, c, h, w = x0.shape
        packed = pipe._pack_latents(xt, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", xt.dtype)
        pred = pipe.transformer(hidden_states=packed, timestep=sigma, img_ids=img_ids, guidance=None, **cond).sample
        return torch.nn.functional.mse_loss(pred, pipe._pack_latents(target, b, c, h, w))
    pred = pipe.transformer(hidden_states=xt, timestep=sigma * 1000, **cond).sample
    return torch.nn.functional.mse_loss(pred, target)


class LatentPool:
    """Dataset samples ``0..size-1`` encoded once, on first use (the VAE is frozen by then).

    Encoding costs as much as a denoiser step; a pool re-uses each sample ``steps·B/size`` times.
    """

    def __init__(self, pipe, kind: str, size: int, seed: int):
        self.pipe, self.kind, self.size, self.seed = pipe, kind, size, seed
        self.latents: dict[int, torch.Tensor] = {}
        self.captions: dict[int, str] = {}

    def get(self, step: int, n: int) -> tuple[torch.Tensor, list[str]]:
        idx = [(step * n + j) % self.size for j in range(n)]
        todo = [i for i in idx if i not in self.latents]
        if todo:
            spec = SPECS[self.kind]
            pix, caps = batch(np.array(todo) + self.seed * 10_000_000, spec.size, spec.frames, spec.max_shapes)
            x = torch.from_numpy(pix)
            x = x.permute(0, 2, 1, 3, 4).contiguous() if self.kind == "wan21" else x[:, 0]
            with torch.no_grad():
                z = _encode(self.pipe, self.kind, x)
            for i, zi, c in zip(todo, z, caps):
                self.latents[i], self.captions[i] = zi, c
        return torch.stack([self.latents[i] for i in idx]), [self.captions[i] for i in idx]


def train(kind: str, steps: int | None = None, batch_size: int | None = None, seed: int = 0, work: Path | None = None,
          out: Path | None = None, vae_steps: int | None = None, vae_batch: int | None = None, ckpt_every: int = 200,
          caption_dropout: float = 0.1, pool: int = 4096, vae_from: Path | None = None, cooldown: int | None = None,
          lr: float | None = None, timesteps: str | None = None) -> Path:
    """Train ``kind`` (both stages; resumes from ``work``) and export the EMA pipeline to ``out``.

    ``None`` options take the kind's recipe in :data:`SPECS`. ``cooldown``: the rate falls linearly to 0 over
    the run's last ``cooldown`` steps (0: constant to the end; by default the recipe's share of ``steps``);
    ``lr``: the denoiser's peak rate; ``timesteps``: as in :class:`Spec`."""
    spec = SPECS[check_kind(kind)]
    steps = spec.steps if steps is None else steps
    batch_size = spec.batch if batch_size is None else batch_size
    cooldown = round(spec.cooldown * steps / spec.steps) if cooldown is None else cooldown
    lr = spec.lr if lr is None else lr
    timesteps = spec.timesteps if timesteps is None else timesteps
    vae_steps = spec.vae_steps if vae_steps is None else vae_steps
    vae_batch = spec.vae_batch if vae_batch is None else vae_batch
    for name, v in (("steps", steps), ("batch", batch_size), ("vae_steps", vae_steps), ("vae_batch", vae_batch),
                    ("ckpt_every", ckpt_every)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 <= cooldown <= steps:
        raise ValueError(f"cooldown must be in [0, steps={steps}], got {cooldown}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if timesteps not in TIMESTEPS:
        raise ValueError(f"timesteps must be one of {TIMESTEPS}, got {timesteps!r}")
    work = Path(work or f"shapes-train/{kind}")
    out = Path(out or MODELS_DIR / kind)
    torch.manual_seed(seed)
    pipe = build(kind, seed)
    pipe.set_progress_bar_config(disable=True)
    if vae_from is not None and not (work / "vae.safetensors").exists():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vae_from, work / "vae.safetensors")
    train_vae(pipe, kind, vae_steps, vae_batch, seed, work)
    for p in pipe.vae.parameters():
        p.requires_grad_(False)
    _set_latent_stats(pipe, kind, seed)

    denoiser = pipe.unet if kind == "sd15" else pipe.transformer
    modules = {"denoiser": denoiser, "text_encoder": pipe.text_encoder}
    if kind == "flux":
        modules["text_encoder_2"] = pipe.text_encoder_2
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone().float() for k, v in _flat(modules).items()}
    ckpt = work / "denoiser.safetensors"
    recipe = recipe_record(modules, seed=seed, batch=batch_size, lr=lr, timesteps=timesteps, pool=pool,
                           caption_dropout=caption_dropout)
    start = _load_ckpt(ckpt, modules, ema, opt, recipe) if ckpt.exists() else 0
    if start > steps:
        raise ValueError(f"{ckpt} is at step {start}, past steps={steps}; pass --steps {start} or more, "
                         f"or another --work folder")
    log = work / "loss.jsonl"
    latents = LatentPool(pipe, kind, pool, seed)
    bar = tqdm(range(start, steps), desc=f"{kind} denoiser", initial=start, total=steps, mininterval=10)
    t0, losses = time.time(), []
    for step in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x0, captions = latents.get(step, batch_size)
        drop = torch.rand(len(captions), generator=gen) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        loss = _loss(pipe, kind, x0, _text(pipe, kind, captions), gen, timesteps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        factor = lr_factor(step, steps, cooldown)  # linear warm-up, constant, then the optional linear cool-down
        for g in opt.param_groups:
            g["lr"] = lr * factor
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in _flat(modules).items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v.float(), 1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _save_ckpt(ckpt, modules, ema, opt, step + 1, recipe)
            with open(log, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": float(np.mean(losses[-ckpt_every:])),
                                    "seconds": round(time.time() - t0, 1)}) + "\n")
            _export_ema(pipe, modules, ema, out)
    if start == steps:  # nothing left to train: the export is the finished run's
        _export_ema(pipe, modules, ema, out)
    return out


def lr_factor(step: int, steps: int, cooldown: int, warmup: int = 100) -> float:
    """The denoiser's rate multiplier at 0-based ``step``: warm-up, constant, cool-down to 0 at ``steps``."""
    cool = 1.0 if step < steps - cooldown else (steps - step) / cooldown
    return min(1.0, (step + 1) / warmup, cool)


def _export_ema(pipe, modules: dict, ema: dict, out: Path) -> None:
    live = {k: v.detach().clone() for k, v in _flat(modules).items()}
    for name, mod in modules.items():
        mod.load_state_dict({k[len(name) + 1:]: ema[k] for k in ema if k.startswith(name + ".")})
        mod.eval()
    export(pipe, out)
    for name, mod in modules.items():
        mod.load_state_dict({k[len(name) + 1:]: live[k] for k in live if k.startswith(name + ".")})
        mod.train()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m attnproc.pipelines.shapes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) one shapes model")
    t.add_argument("kind", choices=sorted(SPECS))
    def recipe(field: str) -> str:
        return ", ".join(f"{k} {getattr(v, field)}" for k, v in SPECS.items())

    t.add_argument("--steps", type=int, default=None, help=f"denoiser steps (default: the recipe: {recipe('steps')})")
    t.add_argument("--batch", type=int, default=None, help=f"denoiser batch (default: {recipe('batch')})")
    t.add_argument("--lr", type=float, default=None, help=f"denoiser peak rate (default: {recipe('lr')})")
    t.add_argument("--cooldown", type=int, default=None,
                   help=f"last N denoiser steps: the rate falls linearly to 0 (default: the recipe's share of "
                        f"--steps, {recipe('cooldown')}; 0 is constant; a resumed run with a larger --steps can add one)")
    t.add_argument("--timesteps", choices=TIMESTEPS, default=None,
                   help=f"flow-matching training times (default: {recipe('timesteps')}; sd15 ignores it)")
    t.add_argument("--vae-steps", type=int, default=None, help=f"VAE steps (default: {recipe('vae_steps')})")
    t.add_argument("--vae-batch", type=int, default=None, help=f"VAE batch (default: {recipe('vae_batch')})")
    t.add_argument("--ckpt-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work", type=Path, default=None, help="checkpoint folder (default shapes-train/KIND)")
    t.add_argument("--out", type=Path, default=None, help="exported pipeline folder (default: the packaged one)")
    t.add_argument("--pool", type=int, default=4096, help="distinct training samples (encoded once)")
    t.add_argument("--vae-from", type=Path, default=None, help="start the VAE stage from this vae.safetensors")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; on idle cores 2 threads are ~1.7x faster, but beside "
                        "another busy process they can be far slower)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = train(a.kind, a.steps, a.batch, a.seed, a.work, a.out, a.vae_steps, a.vae_batch, a.ckpt_every,
                pool=a.pool, vae_from=a.vae_from, cooldown=a.cooldown, lr=a.lr,
                timesteps=a.timesteps)
    print(f"exported {out}")
