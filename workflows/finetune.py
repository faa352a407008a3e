"""``attnproc finetune``: distil a sparse student from the frozen dense teacher (TurboDiffusion's recipe).

The student is the pipeline's denoiser with a method applied; the teacher is a frozen copy of the same denoiser
taken before the method is applied (dense). Per step: a clean latent ``x0``, a time ``t`` (log-normal sigma
mapped to rectified-flow time, or uniform), ``x_t = (1 - t) x0 + t eps``, loss ``mean |student(x_t, t) -
teacher(x_t, t)|^2``. What trains: the method's own parameters (``train: method``), LoRA adapters on the
attention projections (``train: lora``, peft, as diffusers does) or everything (``train: full``).

Data (``data: noised``): ``x0`` and the denoiser's other inputs (text embeddings, masks, ...) are recorded
from one teacher generation with the job's prompt and size: the latent fed to the denoiser at the last denoising
step serves as ``x0``. ``data: trajectory`` trains on the teacher's own denoiser calls instead: the states the
sampler visits, at its timesteps (its shift included), with both halves of classifier-free guidance; with
``guidance_scale`` the loss is on the guided prediction the sampler steps with. ``data: on_policy`` records the
same calls from the *student's* own sparse generation, regenerated every ``refresh_every`` steps: the teacher
gives the target at the states the student actually reaches when it samples (a student trained only on the
teacher's states drifts off them and meets states it never saw). With ``rollout_steps: K`` the loss is end to end
instead: the student's sampler runs K steps from a recorded state with gradients through all of them, against the
dense teacher's K steps from the same state (``rollout.py``). Every step draws its noise (or its recorded
sampler step) from ``(seed, step)``, so a run resumed from a checkpoint continues exactly as an uninterrupted
one.

    attnproc finetune train.yaml                     # CLI
    finetune(load_finetune_config("train.yaml"))     # Python
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .cp import enable_context_parallel, parse_cp
from .jobs import (JobFileError, _check_keys, _fail, _float, _int, _method, _options, _str, config_hash,
                   read_yaml_or_json)
from .rollout import guided, rollout_loss, sampler_sigmas

TRAIN_MODES = ("method", "lora", "full")
TIME_SAMPLING = ("lognormal", "uniform")
DATA = ("noised", "trajectory", "on_policy")
SAMPLER_DATA = ("trajectory", "on_policy")  # data that are the sampler's own calls
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT = "checkpoint.safetensors"


class FinetuneConfigError(JobFileError):
    """A fine-tuning config field that is missing or invalid (the message names it)."""


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Field names are the config file's keys."""

    pipeline: str                                  # tiny:<family>, a local folder or a hub id
    method: Any                                    # a method name (or list: base + edits)
    output: str                                    # folder: checkpoint, losses, final weights
    options: dict = field(default_factory=dict)    # the method's options
    train: str = "lora"                            # method | lora | full
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1                            # latents per step (the recorded batch repeated)
    seed: int = 0
    lora_rank: int = 8
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    time_sampling: str = "lognormal"
    p_mean: float = 1.5                            # log-normal sigma (TurboDiffusion's SLA training)
    p_std: float = 1.6
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    prompt: Any = None                             # data: one teacher generation (a list: one per prompt)
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    data_steps: int = 4
    context_parallel: str | None = None            # "ulysses=N" / "ring=N": each step split across the processes
    data: str = "noised"                           # noised (x0 + sampled t) | trajectory | on_policy (sampler calls)
    guidance_scale: float | None = None            # trajectory / on_policy: loss on uncond + g (cond - uncond)
    refresh_every: int = 50                        # on_policy: steps between the student's regenerations
    step_weights: list | None = None               # trajectory / on_policy: how often each sampler step is drawn
    rollout_steps: int | None = None               # trajectory / on_policy: loss after K sampler steps (rollout.py)
    step_loss_weight: float = 0.0                  # rollout_steps: plus this times the window's first per-step loss
    cooldown: int = 0                              # the rate falls linearly over the last N steps (last: lr / N)


_FIELDS = tuple(FinetuneConfig.__dataclass_fields__)


def _choice(v, where, choices):
    if v not in choices:
        _fail(where, f"must be one of {', '.join(choices)}, got {v!r}")
    return v


def parse_finetune_config(data: Any) -> FinetuneConfig:
    """Validate a config mapping; every error names the field and what it accepts."""
    if not isinstance(data, dict):
        raise FinetuneConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    try:
        _check_keys(data, _FIELDS, "")
        for key in ("pipeline", "method", "output"):
            if key not in data:
                _fail(key, "missing (required)")
        d = dict(data)
        d["pipeline"] = _str(d["pipeline"], "pipeline")
        d["output"] = _str(d["output"], "output")
        d["method"] = _method(d["method"], "method")
        d["options"] = _options(d["method"], d.get("options"), "options")
        if isinstance(d["method"], tuple):
            d["method"] = list(d["method"])
        for key, low in (("steps", 1), ("batch_size", 1), ("seed", 0), ("lora_rank", 1), ("checkpoint_every", 1),
                         ("data_steps", 1), ("refresh_every", 1), ("cooldown", 0)):
            if key in d:
                d[key] = _int(d[key], key, low=low)
        if d.get("cooldown", 0) > d.get("steps", FinetuneConfig.steps):
            _fail("cooldown", f"must be <= steps ({d.get('steps', FinetuneConfig.steps)}), got {d['cooldown']}")
        for key in ("height", "width", "frames"):
            if key in d:
                d[key] = _int(d[key], key, low=1, allow_none=True)
        for key in ("lr", "weight_decay", "p_mean", "p_std"):
            if key in d:
                d[key] = _float(d[key], key, allow_none=False)
        if "lr" in d and not d["lr"] > 0:
            _fail("lr", f"must be > 0, got {d['lr']!r}")
        if "p_std" in d and not d["p_std"] > 0:
            _fail("p_std", f"must be > 0, got {d['p_std']!r}")
        for key, choices in (("train", TRAIN_MODES), ("time_sampling", TIME_SAMPLING), ("data", DATA),
                             ("mixed_precision", MIXED_PRECISION)):
            if key in d:
                _choice(d[key], key, choices)
        if "guidance_scale" in d:
            d["guidance_scale"] = _float(d["guidance_scale"], "guidance_scale")
            if d["guidance_scale"] is not None and d.get("data") not in SAMPLER_DATA:
                _fail("guidance_scale", "needs data: trajectory or on_policy (the recorded conditional and "
                                        "unconditional calls)")
        if d.get("step_weights") is not None:
            w = d["step_weights"]
            if d.get("data") not in SAMPLER_DATA:
                _fail("step_weights", "needs data: trajectory or on_policy (one weight per sampler step)")
            if (not isinstance(w, list) or not w or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and x >= 0 for x in w) or not sum(w) > 0):
                _fail("step_weights", f"must be a list of numbers >= 0 (one per sampler step, not all 0), got {w!r}")
            d["step_weights"] = [float(x) for x in w]
        if d.get("rollout_steps") is not None:
            d["rollout_steps"] = _int(d["rollout_steps"], "rollout_steps", low=1)
            if d.get("data") not in SAMPLER_DATA:
                _fail("rollout_steps", "needs data: trajectory or on_policy (the sampler's recorded states and "
                                       "timesteps to roll out from)")
            if d.get("context_parallel") is not None:
                _fail("context_parallel", "not supported with rollout_steps (the rollout runs in one process)")
        if "step_loss_weight" in d:
            d["step_loss_weight"] = _float(d["step_loss_weight"], "step_loss_weight", allow_none=False)
            if not d["step_loss_weight"] >= 0:
                _fail("step_loss_weight", f"must be >= 0, got {d['step_loss_weight']!r}")
            if d["step_loss_weight"] and d.get("rollout_steps") is None:
                _fail("step_loss_weight", "needs rollout_steps (it adds the per-step loss to the rollout loss)")
        if d.get("data") == "on_policy":
            every, refresh = d.get("checkpoint_every", 50), d.get("refresh_every", 50)
            if every % refresh:  # a resume must start where the uninterrupted run regenerated its trajectories
                _fail("checkpoint_every", f"must be a multiple of refresh_every ({refresh}) with data: on_policy, "
                                          f"got {every}")
            if d.get("context_parallel") is not None:
                _fail("context_parallel", "not supported with data: on_policy (the student samples in one process)")
        if "gradient_checkpointing" in d and not isinstance(d["gradient_checkpointing"], bool):
            _fail("gradient_checkpointing", f"must be true or false, got {d['gradient_checkpointing']!r}")
        if isinstance(d.get("prompt"), list):  # several teacher generations, one batch
            if not d["prompt"] or not all(isinstance(p, str) for p in d["prompt"]):
                _fail("prompt", f"must be a string or a non-empty list of strings, got {d['prompt']!r}")
        elif "prompt" in d:
            d["prompt"] = _str(d["prompt"], "prompt", allow_none=True)
        if d.get("context_parallel") is not None:
            try:
                d["context_parallel"] = str(parse_cp(d["context_parallel"]))
            except ValueError as e:
                _fail("context_parallel", str(e).replace("--cp ", ""))
        if "lora_targets" in d:
            t = d["lora_targets"]
            if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
                _fail("lora_targets", f"must be a non-empty list of module names (e.g. to_q), got {t!r}")
    except JobFileError as e:
        raise FinetuneConfigError(str(e)) from None
    return FinetuneConfig(**d)


def load_finetune_config(path: str | os.PathLike) -> FinetuneConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config; errors name the file and the field."""
    path = Path(path)
    data = read_yaml_or_json(path, FinetuneConfigError, "config")
    try:
        return parse_finetune_config(data)
    except FinetuneConfigError as e:
        raise FinetuneConfigError(f"{path}: {e}") from None


# ---- data: the denoiser's inputs from one teacher generation ---------------------------------------------------
def _denoiser(pipe) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet to fine-tune")


def record_calls(pipe, cfg: FinetuneConfig, seed: int | None = None) -> list[dict]:
    """The keyword inputs of every denoiser call of one generation of ``pipe`` as it is (dense before ``apply``,
    the student after) with ``cfg``'s prompt and size; its noise from ``seed`` (default ``cfg.seed``)."""
    den = _denoiser(pipe)
    if cfg.pipeline.startswith("tiny:"):
        from attnproc.pipelines import tiny_call_kwargs

        call = tiny_call_kwargs(cfg.pipeline[5:])
    elif cfg.pipeline.startswith("shapes:"):  # what the shapes model was trained for (size, frames, guidance)
        from attnproc.pipelines import shapes_call_kwargs

        call = shapes_call_kwargs(cfg.pipeline[7:], cfg.prompt or "")
    else:
        call = {}
    call.update(num_inference_steps=cfg.data_steps, output_type="latent",
                generator=torch.Generator().manual_seed(cfg.seed if seed is None else seed))
    for key, value in (("prompt", cfg.prompt), ("height", cfg.height), ("width", cfg.width),
                       ("num_frames", cfg.frames)):
        if value is not None:
            call[key] = value
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append(dict(kwargs, **({"hidden_states": args[0]} if args else {})))

    handle = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call)
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the pipeline never called its denoiser; cannot record training inputs")
    return [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()
             if k != "return_dict"} for c in calls]


def record_inputs(pipe, cfg: FinetuneConfig) -> tuple[torch.Tensor, dict]:
    """``(x0, other kwargs)``: the denoiser's inputs at the last step of one generation with ``cfg``'s prompt
    and size (its other inputs from the first call: text embeddings, masks, guidance)."""
    calls = record_calls(pipe, cfg)
    x0 = calls[-1]["hidden_states"]
    rest = {k: v for k, v in calls[0].items() if k not in ("hidden_states", "timestep")}
    rest["timestep_like"] = calls[0]["timestep"]
    return x0, rest


def sampler_steps(calls: list[dict], guidance_scale: float | None) -> list[list[dict]]:
    """The recorded calls grouped by sampler step (consecutive calls at one timestep). With ``guidance_scale``
    every step must be a (conditional, unconditional) pair, the order diffusers' separate-call CFG uses."""
    groups: list[list[dict]] = []
    for call in calls:
        if groups and torch.equal(torch.as_tensor(groups[-1][0]["timestep"]), torch.as_tensor(call["timestep"])):
            groups[-1].append(call)
        else:
            groups.append([call])
    if guidance_scale is not None:
        bad = sorted({len(g) for g in groups if len(g) != 2})
        if bad:
            raise ValueError(f"guidance_scale: needs one conditional and one unconditional denoiser call per "
                             f"sampler step, but the pipeline made {bad} call(s) per step (CFG off, or batched "
                             f"into one call); leave guidance_scale null")
    return groups


def _to(call: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in call.items()}


def sample_time(gen: torch.Generator, n: int, cfg: FinetuneConfig) -> torch.Tensor:
    """Rectified-flow times in (0, 1): ``sigma / (1 + sigma)`` with log-normal sigma, or uniform."""
    if cfg.time_sampling == "uniform":
        return torch.rand(n, generator=gen, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(n, generator=gen, dtype=torch.float64))
    return sigma / (1 + sigma)


def _timestep(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the denoiser's units (1000 * t, the flow-matching pipelines' scale), shaped like ``like``."""
    ts = t * 1000.0
    if like.dim() == 0:
        ts = ts[0]
    elif like.shape[0] != ts.shape[0]:
        ts = ts.repeat_interleave(like.shape[0] // ts.shape[0])
    return ts.round().to(like.dtype) if not like.is_floating_point() else ts.to(like.dtype)


# ---- what trains ---------------------------------------------------------------------------------------------
def _trainable(cfg: FinetuneConfig, student, handle, params) -> list[tuple[str, torch.nn.Parameter]]:
    if params is not None:
        named = list(params)
    elif cfg.train == "full":
        named = list(student.named_parameters())
    elif cfg.train == "lora":
        from peft import LoraConfig

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=cfg.lora_targets,
                                       init_lora_weights=True))
        named = [(n, p) for n, p in student.named_parameters() if "lora_" in n]
    else:  # the per-module state the method created (Method.create_state), named as in handle.state_dict()
        named = [(f"{module}.attnproc.{key}", p) for module, state in handle.states().items()
                 for key, p in state.named_parameters()]
        if not named:
            raise ValueError(f"train: method: method {handle.name!r} owns no trainable parameters; "
                             f"use train: lora or train: full")
    if not named:
        raise ValueError(f"train: {cfg.train}: nothing to train (no parameters found)")
    for _, p in named:
        p.requires_grad_(True)
    return named


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, step: int, named, optimizer, losses: list[float], chash: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in named}
    for i, (n, p) in enumerate(named):
        for key, value in optimizer.state.get(p, {}).items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{n}.{key}"] = t.detach().cpu().contiguous()
    meta = {"step": str(step), "config": chash, "losses": json.dumps(losses)}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    os.replace(partial, path)


def _load_checkpoint(path: Path, named, optimizer, chash: str, kind: str = "fine-tuning config"
                     ) -> tuple[int, list[float]]:
    """Restore a checkpoint written by the same config (``kind`` names it in the error: the fine-tuning or the
    train-concept config share this machinery)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("config") != chash:
            raise ValueError(f"{path} was written by a different {kind}; use another output folder "
                             f"or delete the checkpoint to start over")
        keys = set(f.keys())
        for n, p in named:
            if f"param.{n}" not in keys:
                raise ValueError(f"{path}: no saved value for trainable parameter {n!r}")
            with torch.no_grad():
                p.copy_(f.get_tensor(f"param.{n}"))
            state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys if k.startswith(f"optim.{n}.")
                     and "." not in k[len(f"optim.{n}."):]}
            if state:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
    return int(meta["step"]), json.loads(meta.get("losses", "[]"))


@dataclass
class FinetuneResult:
    output: Path
    weights: Path
    steps: int
    losses: list[float]
    resumed_from: int


def finetune(cfg: FinetuneConfig, *, pipe=None, params: Iterable | None = None,
             callback: Callable[[int, float], None] | None = None, progress: bool = True,
             cp_setup: Callable | None = None) -> FinetuneResult:
    """Run (or resume) ``cfg``. ``pipe``: an already loaded pipeline (else ``cfg.pipeline`` is loaded);
    ``params``: ``(name, parameter)`` pairs to train instead of ``cfg.train``'s choice; ``callback(step, loss)``
    after every optimizer step. The final weights go to ``<output>/weights.safetensors`` (LoRA: also diffusers'
    ``pytorch_lora_weights.safetensors`` where the pipeline class can save LoRA).

    ``cfg.context_parallel`` (under ``torchrun``): the student runs each step under diffusers' context
    parallelism across every process (``cp_setup(model, config)`` enables it; default ``enable_parallelism``);
    the teacher runs whole on each. Every rank's loss is the same, and its gradient covers its own shard, so the
    sum over ranks is the full gradient: the loss is scaled by the degree to undo DDP's averaging."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import attnproc

    from .render import load_pipeline

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    unused = {"output", "checkpoint_every", "context_parallel"}  # same result either way
    unused |= {"step_weights"} if cfg.step_weights is None else set()  # fields that change nothing here stay out,
    unused |= {"refresh_every"} if cfg.data != "on_policy" else set()  # so older checkpoints still resume
    unused |= {"rollout_steps", "step_loss_weight"} if cfg.rollout_steps is None else set()
    unused |= {"cooldown"} if not cfg.cooldown else set()
    chash = config_hash({k: v for k, v in asdict(cfg).items() if k not in unused})
    cp_spec = parse_cp(cfg.context_parallel)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if cp_spec is not None:
        cp_spec.check_world(accelerator.num_processes, "context_parallel:")
    if pipe is None:
        pipe = load_pipeline(cfg.pipeline, {"seed": cfg.seed})
    student = _denoiser(pipe)
    groups = sigmas = None
    if cfg.data == "trajectory":
        groups = sampler_steps(record_calls(pipe, cfg), cfg.guidance_scale)
        sigmas = sampler_sigmas(pipe, len(groups)) if cfg.rollout_steps else None
    elif cfg.data == "noised":
        x0, rest = record_inputs(pipe, cfg)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if cp_spec is not None:  # the student only, before apply (the order attnproc needs)
        enable_context_parallel(pipe, cp_spec, cp_setup)
    handle = attnproc.apply(pipe, cfg.method, **cfg.options)
    try:
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        named = _trainable(cfg, student, handle, params)
        if cfg.gradient_checkpointing and not cfg.rollout_steps:  # a rollout checkpoints whole sampler steps
            if not hasattr(student, "enable_gradient_checkpointing"):
                raise ValueError(f"gradient_checkpointing: {type(student).__name__} does not support it")
            student.enable_gradient_checkpointing()
        student.train()
        optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.999))
        student, optimizer = accelerator.prepare(student, optimizer)
        teacher.to(accelerator.device)
        ckpt = out / CHECKPOINT
        start, losses = (0, [])
        if ckpt.exists():
            start, losses = _load_checkpoint(ckpt, named, optimizer, chash)
        if cfg.data == "trajectory":
            groups = [[_to(c, accelerator.device) for c in g] for g in groups]
        elif cfg.data == "noised":
            batch = _noised_batch(x0, rest, cfg, accelerator.device)
        elif start % cfg.refresh_every and start < cfg.steps:
            raise ValueError(f"{ckpt} is at step {start}, not a multiple of refresh_every ({cfg.refresh_every}); "
                             f"delete it to start over")
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="finetune")
        for step in bar:
            if cfg.data == "on_policy" and step % cfg.refresh_every == 0:
                groups = own_trajectory(pipe, student, cfg, step, accelerator.device)
                sigmas = sampler_sigmas(pipe, len(groups)) if cfg.rollout_steps else None
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            pick = pick_step(gen, len(groups), cfg) if groups is not None else None
            calls = groups[pick] if groups is not None else [_noised_call(gen, batch, cfg)]
            with accelerator.autocast():
                if cfg.rollout_steps:
                    loss = rollout_loss(student, teacher, groups, sigmas, pick, cfg.rollout_steps, cfg.guidance_scale,
                                        cfg.step_loss_weight, checkpoint_steps=cfg.gradient_checkpointing)
                else:
                    with torch.no_grad():
                        targets = guided([teacher(**c, return_dict=False)[0] for c in calls], cfg.guidance_scale)
                    preds = guided([student(**c, return_dict=False)[0] for c in calls], cfg.guidance_scale)
                    loss = sum(torch.mean((p.float() - t.float()) ** 2) for p, t in zip(preds, targets)) / len(preds)
            accelerator.backward(loss * (cp_spec.degree if cp_spec is not None else 1))
            for group in optimizer.param_groups:  # from the step alone, so a resumed run gets the same rates
                group["lr"] = step_lr(cfg, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            done = step + 1
            if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_checkpoint(ckpt, done, named, optimizer, losses, chash)
            if callback is not None:
                callback(done, losses[-1])
        weights = out / "weights.safetensors"
        if accelerator.is_main_process:  # every rank holds the same weights (data parallel or CP): one writer
            weights = _export(out, cfg, pipe, accelerator.unwrap_model(student), named, handle)
            (out / "losses.json").write_text(json.dumps(losses))
        accelerator.wait_for_everyone()
        return FinetuneResult(out, weights, cfg.steps, losses, start)
    finally:
        handle.remove()


def step_lr(cfg: FinetuneConfig, step: int) -> float:
    """The rate of 0-based optimizer ``step``: ``lr``, falling linearly over the last ``cooldown`` steps (the
    shapes recipe's schedule without its warm-up: a fine-tune starts from trained weights)."""
    from attnproc.pipelines.shapes_train import lr_factor

    return cfg.lr * lr_factor(step, cfg.steps, cfg.cooldown, warmup=1)


def pick_step(gen: torch.Generator, n: int, cfg: FinetuneConfig) -> int:
    """The recorded sampler step this optimizer step trains on: uniform, or drawn by ``step_weights`` (e.g. more
    often the high-noise steps, whose errors the rest of the trajectory inherits)."""
    if cfg.step_weights is None:
        return int(torch.randint(n, (1,), generator=gen))
    if len(cfg.step_weights) != n:
        raise ValueError(f"step_weights: has {len(cfg.step_weights)} weights, but the sampler made {n} steps "
                         f"(data_steps); give one weight per sampler step")
    return int(torch.multinomial(torch.tensor(cfg.step_weights, dtype=torch.float64), 1, generator=gen))


def own_trajectory(pipe, student, cfg: FinetuneConfig, step: int, device) -> list[list[dict]]:
    """``data: on_policy``: the student's own generation (its sparse attention and current weights, the
    pipeline's sampler and CFG) with the config's prompts, noise seeded by ``(seed, step)``, grouped by sampler
    step. Depends only on the weights at ``step``, so a resume at a refresh step regenerates it exactly."""
    student.eval()
    try:
        calls = record_calls(pipe, cfg, seed=cfg.seed * 1_000_003 + step + 500_000_000)
    finally:
        student.train()
    return [[_to(c, device) for c in g] for g in sampler_steps(calls, cfg.guidance_scale)]


def _noised_batch(x0, rest, cfg: FinetuneConfig, device) -> tuple:
    """``(x0, kwargs, timestep_like)`` with the recorded batch repeated ``batch_size`` times, on ``device``."""
    like = rest.pop("timestep_like")
    x0 = x0.repeat(cfg.batch_size, *([1] * (x0.dim() - 1))).to(device)
    kwargs = {k: (v.repeat(cfg.batch_size, *([1] * (v.dim() - 1))).to(device)
                  if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == x0.shape[0] // cfg.batch_size
                  else v) for k, v in rest.items()}
    like = like.repeat(cfg.batch_size) if like.dim() else like
    return x0, kwargs, like


def _noised_call(gen: torch.Generator, batch: tuple, cfg: FinetuneConfig) -> dict:
    """One training input: ``x_t = (1 - t) x0 + t eps`` at a sampled time, with the recorded conditioning."""
    x0, kwargs, like = batch
    t = sample_time(gen, 1, cfg)
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    tb = t.to(x0.dtype).to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
    return dict(kwargs, hidden_states=(1 - tb) * x0 + tb * eps, timestep=_timestep(t, like).to(x0.device))


def _export(out: Path, cfg: FinetuneConfig, pipe, student, named, handle) -> Path:
    """The trained tensors by name (``weights.safetensors``, its metadata: ``train``, ``method`` and the method's
    ``options`` as JSON, so the weights say what they were trained under); LoRA also in diffusers' format when possible; a
    method's own parameters in its own file format when it has one (``save_weights``: what
    ``apply(..., weights=...)`` loads)."""
    from safetensors.torch import save_file

    path = out / "weights.safetensors"
    saver = getattr(handle.method, "save_weights", None)
    if cfg.train == "method" and saver is not None:
        return saver(path, pipe, handle.states())
    partial = path.with_name(path.name + ".partial")
    save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(partial),
              metadata={"train": cfg.train, "method": json.dumps(cfg.method),
                        "options": json.dumps(cfg.options, sort_keys=True, default=str)})
    os.replace(partial, path)
    if cfg.train == "lora" and hasattr(type(pipe), "save_lora_weights"):
        from peft.utils import get_peft_model_state_dict

        type(pipe).save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(student))
    return path


def summarize_losses(losses: list[float]) -> str:
    if not losses:
        return "no steps run"
    k = max(1, math.ceil(len(losses) / 10))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"loss {first:.4g} (first {k} steps) -> {last:.4g} (last {k})"
