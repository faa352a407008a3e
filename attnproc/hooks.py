"""The step hook: a stateful diffusers ModelHook that tells our processors the layout and step of each forward.

The step index comes from the pipeline's scheduler (the forward's ``timestep`` matched against
``scheduler.timesteps``) or from diffusers' ``CacheContext`` when the pipeline provides one. It is never
counted from attention calls, which breaks with CFG batching, extra guidance branches or other step counts.
"""
from __future__ import annotations

import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .context import DenoiserContext, StepContext
from .families import Family, _bind
from .layout import TokenLayout

HOOK_NAME = "attnproc.step"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _scalar_timestep(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


class StepTracker:
    """Maps a forward's timestep to the denoising step, shared by all denoisers of one pipeline (Wan 2.2's two
    experts agree on the index because both read the same scheduler)."""

    def __init__(self, pipe=None):
        self._pipe = weakref.ref(pipe) if pipe is not None else None

    @property
    def pipe(self):
        return self._pipe() if self._pipe is not None else None

    def index_of(self, timestep: float) -> tuple[int | None, int | None]:
        pipe = self.pipe
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None, None
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        diffs = (ts - timestep).abs()
        i = int(diffs.argmin())
        gaps = (ts[1:] - ts[:-1]).abs()
        gaps = gaps[gaps > 0]
        tol = float(gaps.min()) / 2 if gaps.numel() else max(1e-3, abs(timestep) * 1e-3)
        if float(diffs[i]) > tol:
            return None, len(ts)
        return i, len(ts)

    def cfg_batched(self) -> bool | None:
        """Whether the pipeline is running classifier-free guidance now (None without a pipeline). Pipelines
        without the ``do_classifier_free_guidance`` property (CogVideoX) decide from ``_guidance_scale > 1``."""
        pipe = self.pipe
        if pipe is None:
            return None
        try:
            return bool(getattr(pipe, "do_classifier_free_guidance"))
        except AttributeError:  # no such property, or it reads attributes set only inside __call__
            scale = getattr(pipe, "_guidance_scale", None)
            return None if scale is None else bool(scale > 1)


class StepHook(ModelHook):
    """Fills the denoiser's :class:`DenoiserContext` before each forward and clears it after."""

    _is_stateful = True

    def __init__(self, family: Family, context: DenoiserContext, tracker: StepTracker):
        super().__init__()
        self.family = family
        self.context = context
        self.tracker = tracker
        self.cache = StateManager(_NoState)  # diffusers' cache_context() writes the CacheContext here

    def pre_forward(self, module, *args, **kwargs):
        a = _bind(module, args, kwargs)
        grid, text_valid = self.family.grid_of(module, a)
        cache = self.cache._context
        batch = _batch_size(a)
        branches, branch = self._branches(cache, batch)
        t = _scalar_timestep(a.get("timestep"))
        timestep = None if t is None else t * self.family.timestep_scale
        index, num = (None, None) if timestep is None else self.tracker.index_of(timestep)
        if cache is not None and cache.step_index is not None:
            index = cache.step_index
            num = cache.num_inference_steps or num
        step = StepContext(index=index, num_steps=num, timestep=float("nan") if timestep is None else timestep,
                           branch=branch, denoiser=self.context.denoiser)
        self.context.set(TokenLayout(*grid, branches=branches), step, text_valid)
        return args, kwargs

    def _branches(self, cache, batch: int | None):
        if cache is not None and cache.name in ("cond", "uncond"):
            return (cache.name,), cache.name
        batched = self.tracker.cfg_batched()
        if self.family.batched_cfg and batched and batch and batch % 2 == 0:
            return ("uncond", "cond"), "batched"
        if batched is None and self.tracker.pipe is None:
            return None, None
        return ("cond",), "cond"

    def post_forward(self, module, output):
        # gradient checkpointing re-runs the blocks during backward, after this forward returned: keep the
        # context for that recompute (the next forward overwrites it)
        if not (module.training and torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False)):
            self.context.clear()
        return output

    def reset_state(self, module):
        self.context.clear()
        return module


def _batch_size(a: dict) -> int | None:
    for key in ("hidden_states", "sample"):
        x = a.get(key)
        if isinstance(x, torch.Tensor):
            return int(x.shape[0])
    return None


def install(model: torch.nn.Module, hook: StepHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(hook, HOOK_NAME)


def uninstall(model: torch.nn.Module) -> bool:
    """Remove our hook; drop the registry and forward wrapper diffusers left behind if nothing else uses them."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return False
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks:
        bound = model.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(model).forward:
            del model.forward
    return True
