"""``attnproc train-concept``: learn a key-locked (Perfusion) concept from a few images of it.

What trains (the reference recipe, ChenDarYen's Perfusion configs): the new token's input embedding, started at
the superclass word's (textual inversion, lr 0.006), and ``o*_V`` of every cross-attention module (lr 0.03);
``o*_K = W_K e_super`` stays locked; ``i*`` follows the token's encoding with an EMA (0.99). AdamW, batch 4 ×
gradient accumulation 4, 400 steps, gate β 0.75 / τ 0.1 while training (the file gets the inference defaults
β 0.7 / τ 0.15). Loss: the diffusion loss (the scheduler's ε or v target), weighted by the subject masks when a
mask folder is given. Prompts: random templates, or each image's own caption (``captions``: trained beside other
objects named in its prompt, the concept survives prompts that name other objects). The trainer machinery is
fine-tuning's (``workflows/finetune.py``): accelerate, the atomic checkpoint with optimizer state (resume
continues exactly: every step draws from ``(seed, step)``), progress bar, the YAML/JSON config reader and field
checks. SDXL: one trainable vector holds the token's row in both text encoders. ``edit: false`` trains plain
textual inversion (no edit): the sanity baseline of docs/perfusion.md.

    attnproc train-concept --pipeline shapes:sd15 --images flag/ --token "<flag>" --superclass square \\
        --covariance sd15-C.safetensors --output runs/flag          # writes runs/flag/concept.safetensors
    train_concept(ConceptConfig(...))                                # Python
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .finetune import CHECKPOINT, MIXED_PRECISION, _choice, _load_checkpoint, _save_checkpoint
from .jobs import JobFileError, _check_keys, _fail, _float, _int, _str, config_hash, read_yaml_or_json

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CONCEPT_FILE = "concept.safetensors"


class ConceptConfigError(JobFileError):
    """A train-concept field that is missing or invalid (the message names it)."""


@dataclass
class ConceptConfig:
    """One concept training run. Field names are the config file's keys and the CLI's flags."""

    pipeline: str                      # shapes:sd15, tiny:sd15, tiny:sdxl, a local folder or a hub id (SD 1.x/2.x, SDXL)
    images: str                        # folder of 4–20 images of the concept
    token: str                         # the new word, e.g. "<flag>" (must not be a token yet)
    superclass: str                    # one-token word the keys are locked to, e.g. "square"
    covariance: str                    # the text encoder's covariance file (attnproc keylock-covariance)
    output: str                        # folder: checkpoint and concept.safetensors
    masks: str | None = None           # folder of subject masks named like the images (white = subject)
    captions: str | None = None        # folder of <image stem>.txt: prompts with {} for the token, one a line
                                       # (one is drawn per step; else the templates)
    templates: list = field(default_factory=lambda: ["a photo of a {}", "a rendering of a {}",
                                                     "a close-up photo of a {}", "a good photo of a {}"])
    steps: int = 400
    batch_size: int = 4
    grad_accum: int = 4
    lr_embedding: float = 0.006
    lr_values: float = 0.03
    train_beta: float = 0.75
    train_tau: float = 0.1
    beta: float = 0.7                  # written to the concept file (inference defaults)
    tau: float = 0.15
    ema: float = 0.99
    lock_keys: bool = True             # False: the no-key-locking ablation (o*_K trained too)
    edit: bool = True                  # False: plain textual inversion (embedding only, no edit): the sanity baseline
    seed: int = 0
    checkpoint_every: int = 50
    mixed_precision: str = "no"


_FIELDS = tuple(ConceptConfig.__dataclass_fields__)


def parse_concept_config(data: Any) -> ConceptConfig:
    """Validate a config mapping; every error names the field and what it accepts."""
    from attnproc.steer.keylock import BETA_RANGE, TAU_RANGE

    if not isinstance(data, dict):
        raise ConceptConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    try:
        _check_keys(data, _FIELDS, "")
        d = {k: v for k, v in data.items() if v is not None or k in ("masks", "captions")}
        for key in ("pipeline", "images", "token", "superclass", "covariance", "output"):
            if key not in d:
                _fail(key, "missing (required)")
            d[key] = _str(d[key], key)
        d["masks"] = _str(d.get("masks"), "masks", allow_none=True)
        d["captions"] = _str(d.get("captions"), "captions", allow_none=True)
        for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seed", 0), ("checkpoint_every", 1)):
            if key in d:
                d[key] = _int(d[key], key, low=low)
        for key, lo, hi in (("lr_embedding", 0, 10), ("lr_values", 0, 10), ("ema", 0, 1),
                            ("train_beta", *BETA_RANGE), ("beta", *BETA_RANGE),
                            ("train_tau", *TAU_RANGE), ("tau", *TAU_RANGE)):
            if key in d:
                d[key] = _float(d[key], key, allow_none=False)
                if not lo <= d[key] <= hi or (key.startswith("lr") and d[key] == 0):
                    _fail(key, f"must be in {'(' if key.startswith('lr') else '['}{lo:g}, {hi:g}], got {d[key]!r}")
        if "templates" in d:
            t = d["templates"]
            if not isinstance(t, list) or not t or not all(isinstance(x, str) and x.count("{}") == 1 for x in t):
                _fail("templates", f"must be a non-empty list of prompts with one {{}} for the word, got {t!r}")
        for key in ("lock_keys", "edit"):
            if key in d and not isinstance(d[key], bool):
                _fail(key, f"must be true or false, got {d[key]!r}")
        if "mixed_precision" in d:
            _choice(d["mixed_precision"], "mixed_precision", MIXED_PRECISION)
    except JobFileError as e:
        raise ConceptConfigError(str(e)) from None
    return ConceptConfig(**d)


def load_concept_config(path: str | os.PathLike, **overrides) -> ConceptConfig:
    """Read a YAML/JSON config; ``overrides`` (e.g. CLI flags that were given) replace its fields."""
    path = Path(path)
    data = read_yaml_or_json(path, ConceptConfigError, "config")
    if not isinstance(data, dict):
        raise ConceptConfigError(f"{path}: config must be a mapping at the top level")
    try:
        return parse_concept_config({**data, **overrides})
    except ConceptConfigError as e:
        raise ConceptConfigError(f"{path}: {e}") from None


# ---- data --------------------------------------------------------------------------------------------------------
def _files(folder: str, what: str) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise ConceptConfigError(f"{what}: {folder!r} is not a folder")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXT)
    if not files:
        raise ConceptConfigError(f"{what}: {folder!r} holds no images ({', '.join(IMAGE_EXT)})")
    return files


def load_images(cfg: ConceptConfig, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pixels [N, 3, size, size] in [-1, 1], masks [N, 1, size, size] in [0, 1] or None)``."""
    import numpy as np
    from PIL import Image

    files = _files(cfg.images, "images")
    if not 1 <= len(files) <= 64:
        raise ConceptConfigError(f"images: give 4–20 images of the concept, found {len(files)}")

    def read(path: Path, mode: str) -> torch.Tensor:
        img = Image.open(path).convert(mode).resize((size, size), Image.BICUBIC)
        a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        return a.permute(2, 0, 1) if a.ndim == 3 else a[None]

    pixels = torch.stack([read(f, "RGB") for f in files]) * 2 - 1
    if cfg.masks is None:
        return pixels, None
    masks = {f.stem: f for f in _files(cfg.masks, "masks")}
    missing = [f.name for f in files if f.stem not in masks]
    if missing:
        raise ConceptConfigError(f"masks: no mask named like {missing[:3]} in {cfg.masks!r}")
    return pixels, torch.stack([read(masks[f.stem], "L") for f in files])


def load_captions(cfg: ConceptConfig) -> list[list[str]] | None:
    """Each image's own prompts (``<stem>.txt`` in ``cfg.captions``, one a line, each with one ``{}`` for the
    token), in image order: a concept drawn beside other objects is trained with prompts that name them (several
    lines: e.g. both orders of "a {} and a yellow square")."""
    if cfg.captions is None:
        return None
    folder = Path(cfg.captions)
    if not folder.is_dir():
        raise ConceptConfigError(f"captions: {cfg.captions!r} is not a folder")
    out = []
    for f in _files(cfg.images, "images"):
        path = folder / f"{f.stem}.txt"
        if not path.is_file():
            raise ConceptConfigError(f"captions: no {path.name} for image {f.name} in {cfg.captions!r}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        bad = [line for line in lines if line.count("{}") != 1]
        if not lines or bad:
            raise ConceptConfigError(f"captions: {path.name} must hold prompts (one a line) with one {{}} for the "
                                     f"token each, got {(bad or [''])[0]!r}")
        out.append(lines)
    return out


@torch.no_grad()
def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    lat = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


# ---- training ------------------------------------------------------------------------------------------------------
@dataclass
class ConceptResult:
    concept: Path
    steps: int
    losses: list[float]
    resumed_from: int


def train_concept(cfg: ConceptConfig, *, pipe=None, progress: bool = True,
                  callback: Callable[[int, float], None] | None = None) -> ConceptResult:
    """Run (or resume) ``cfg``; the concept goes to ``<output>/concept.safetensors``. ``pipe``: an already loaded
    pipeline (else ``cfg.pipeline`` is loaded); it is left as it was (the token is removed again)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import attnproc
    from attnproc.pipelines import concepts as cc

    from .render import load_pipeline

    out = Path(cfg.output)
    unused = {"output", "checkpoint_every", "steps"} | ({"captions"} if cfg.captions is None else set())
    chash = config_hash({k: v for k, v in asdict(cfg).items() if k not in unused})  # older checkpoints still resume
    if pipe is None:
        pipe = load_pipeline(cfg.pipeline, {"seed": cfg.seed})
    c, meta = cc.load_covariance(cfg.covariance)
    if meta.get("text_encoder") and meta["text_encoder"] != cc.text_fingerprint(pipe):
        raise ConceptConfigError(f"covariance: {cfg.covariance!r} is for another text encoder "
                                 f"({meta['text_encoder']}, this pipeline's is {cc.text_fingerprint(pipe)}); "
                                 "estimate C for this one with `attnproc keylock-covariance`")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels, masks = load_images(cfg, size)
    captions = load_captions(cfg)
    _check_token_fits(pipe, cfg, captions)
    latents = encode_latents(pipe, pixels)
    if masks is not None:
        masks = torch.nn.functional.interpolate(masks, size=latents.shape[-2:], mode="area")
    concept = cc.initial_concept(pipe, cfg.token, cfg.superclass, cfg.templates)
    concept.beta, concept.tau = cfg.beta, cfg.tau
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    out.mkdir(parents=True, exist_ok=True)
    if cfg.edit:
        handle = attnproc.apply(pipe, "keylock", concepts=[concept], covariance=c, beta=cfg.train_beta,
                                tau=cfg.train_tau, lock_keys=cfg.lock_keys)
    else:  # plain textual inversion: the token alone, no edit (o*_K/o*_V stay the superclass's)
        cc.add_tokens(pipe, [concept])
    parts = cc.text_encoders(pipe)
    tid = parts[0][1].convert_tokens_to_ids(cfg.token)
    embedding = torch.nn.Parameter(concept.embedding.clone().to(parts[0][0].device))
    hooks, offset = [], 0
    for te, tok in parts:  # each encoder's row of the token is its slice of the one trainable vector
        width = te.get_input_embeddings().weight.shape[-1]
        hooks.append(te.get_input_embeddings().register_forward_hook(
            _swap_row(tok.convert_tokens_to_ids(cfg.token), embedding, offset, width)))
        offset += width
    flags = {p: p.requires_grad for m in (pipe.unet, pipe.vae, *(te for te, _ in parts)) for p in m.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        states = handle.states() if cfg.edit else {}
        named = [("embedding", embedding), ("i_star", concept.i_star)]
        named += [(f"{n}.o_v", s.keylock.o_v) for n, s in states.items()]
        if not cfg.lock_keys:
            named += [(f"{n}.o_k", s.keylock.o_k) for n, s in states.items()]
        for _, p in named[2:]:
            p.requires_grad_(True)
        groups = [{"params": [embedding], "lr": cfg.lr_embedding}]
        groups += [{"params": [p for _, p in named[2:]], "lr": cfg.lr_values}] if named[2:] else []
        optimizer = torch.optim.AdamW(groups)
        optimizer = accelerator.prepare(optimizer)
        ckpt = out / CHECKPOINT
        start, losses = _load_checkpoint(ckpt, named, optimizer, chash, "train-concept config") if ckpt.exists() else (0, [])
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the sampler's betas, as a training schedule
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
                   desc="train-concept")
        for step in bar:
            total = 0.0
            for micro in range(cfg.grad_accum):
                loss = _micro_step(pipe, cfg, concept, latents, masks, captions, sched, tid,
                                   torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 97 + micro))
                accelerator.backward(loss / cfg.grad_accum)
                total += loss.item() / cfg.grad_accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            if callback is not None:
                callback(step, total)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _save_checkpoint(ckpt, step + 1, named, optimizer, losses, chash)
        concept.embedding = embedding.detach().float().cpu().clone()
        module = {n: n.split(".", 1)[1] for n in states}  # "unet.<module>" -> "<module>"
        if states:
            concept.values = {module[n]: s.keylock.o_v.detach()[0].float().cpu().clone() for n, s in states.items()}
            concept.keys = {module[n]: s.keylock.o_k.detach()[0].float().cpu().clone() for n, s in states.items()}
        concept.i_star = concept.i_star.detach().float().cpu().clone()
        concept.extra = {"images": len(pixels), "steps": cfg.steps, "masks": masks is not None,
                         "lock_keys": cfg.lock_keys, "edit": cfg.edit, "covariance": meta.get("text_encoder", "")}
        path = cc.save_concept(concept, out / CONCEPT_FILE)
    finally:
        for hook in hooks:
            hook.remove()
        if cfg.edit:
            attnproc.remove(pipe)
        else:
            cc.remove_tokens(pipe, [cfg.token])
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return ConceptResult(path, cfg.steps, losses, start)


def _check_token_fits(pipe, cfg: ConceptConfig, captions: list[list[str]] | None) -> None:
    """Every prompt must keep the token inside the text encoder's window: past it the batch has no token
    position, and ``i*`` (a mean over those positions) would become NaN."""
    from attnproc.pipelines.concepts import text_encoders

    prompts = [("templates", i, t) for i, t in enumerate(cfg.templates)]
    if captions is not None:
        prompts = [(f"captions (image {i + 1})", j, line) for i, lines in enumerate(captions)
                   for j, line in enumerate(lines)]
    for _, tok in text_encoders(pipe):
        for field, line_no, prompt in prompts:
            before = tok(prompt.split("{}")[0], truncation=False).input_ids  # BOS + words (+ EOS)
            position = len(before) - (1 if before[-1:] == [tok.eos_token_id] else 0)
            if position > tok.model_max_length - 2:  # the last place is the end token's
                raise ConceptConfigError(
                    f"{field}: prompt {line_no + 1} ({prompt[:40]!r}...) puts the token past the text encoder's "
                    f"{tok.model_max_length} tokens; shorten it")


def _swap_row(token_id: int, embedding: torch.nn.Parameter, start: int, width: int):
    """A forward hook on an input-embedding layer putting ``embedding[start:start+width]`` at ``token_id``."""
    def hook(module, args, output):
        hit = (args[0] == token_id).unsqueeze(-1)
        return torch.where(hit, embedding[start:start + width].to(output.dtype), output)
    return hook


def _micro_step(pipe, cfg: ConceptConfig, concept, latents, masks, captions, sched, tid: int,
                gen: torch.Generator):
    """One batch: EMA of ``i*`` from the token's current encoding, then the (masked) diffusion loss. Prompts: the
    images' own captions when given, else random templates."""
    from attnproc.pipelines.concepts import encode_for_denoiser

    n = latents.shape[0]
    idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
    prompts = [cfg.templates[int(i)].format(cfg.token)
               for i in torch.randint(0, len(cfg.templates), (cfg.batch_size,), generator=gen)]
    if captions is not None:  # an image of one caption line draws nothing (runs stay as they were)
        lines = [captions[int(i)] for i in idx]
        prompts = [(ls[int(torch.randint(0, len(ls), (1,), generator=gen))] if len(ls) > 1 else ls[0])
                   .replace("{}", cfg.token) for ls in lines]
    enc, ids, extra = encode_for_denoiser(pipe, prompts)
    with torch.no_grad():
        at = enc[ids == tid].float().mean(0)
        concept.i_star.mul_(cfg.ema).add_(at.to(concept.i_star.device), alpha=1 - cfg.ema)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(x0.device)
    noisy = sched.add_noise(x0, noise, t)
    kind = sched.config.prediction_type
    target = sched.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"train-concept supports epsilon and v_prediction schedulers, not {kind!r}")
    if extra:  # SDXL: pooled text and the size/crop ids of a square, uncropped training image
        side = latents.shape[-1] * pipe.vae_scale_factor
        extra["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]], dtype=enc.dtype,
                                         device=enc.device).expand(cfg.batch_size, 6)
    pred = pipe.unet(noisy, t, encoder_hidden_states=enc, added_cond_kwargs=extra or None).sample
    err = (pred.float() - target.float()).square()
    if masks is None:
        return err.mean()
    w = masks[idx].to(err)
    return (err * w).sum() / (w.sum() * err.shape[1]).clamp_min(1e-8)
