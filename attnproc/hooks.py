"""The step hook: a stateful diffusers ModelHook that tells our processors the layout and step of each forward.

The step is the index of the pipeline's denoising loop, the ``i`` its step-end callbacks see. It is read from the
pipeline's scheduler: its position in ``scheduler.timesteps`` (``step_index``, or the forward's ``timestep``
matched against ``timesteps`` for schedulers without one), less the scheduler's ``begin_index`` (img2img and
video2video with ``strength < 1`` start the loop part-way into the schedule). diffusers' ``CacheContext`` wins
where the pipeline provides one. It is never counted from attention calls, which breaks with CFG batching, extra
guidance branches or other step counts.

The hook only hands the context resolvers (see :class:`~attnproc.context.DenoiserContext`): nothing is read
from the inputs or the scheduler unless a method asks, so ``dense`` under ``torch.compile`` sees no graph break
and no per-step recompile from this module.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ._compat import cache_context, hooks_after, parallel_config
from .context import DenoiserContext, StepContext
from .errors import ContextParallelError
from .families import Family
from .layout import TokenLayout

HOOK_NAME = "attnproc.step"
ROOT_SPLIT_HOOK = "cp_input---"  # diffusers' name for the hook splitting the model's own inputs (CP plan key "")


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _scalar_timestep(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


def _int_attr(obj, name: str) -> int | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _match(timesteps: torch.Tensor, timestep: float) -> int | None:
    """Position of ``timestep`` in ``timesteps`` (first match), or None if it is not one of them."""
    if timesteps.numel() == 0:
        return None
    diffs = (timesteps - timestep).abs()
    i = int(diffs.argmin())
    gaps = (timesteps[1:] - timesteps[:-1]).abs()
    gaps = gaps[gaps > 0]
    tol = float(gaps.min()) / 2 if gaps.numel() else max(1e-3, abs(timestep) * 1e-3)
    return i if float(diffs[i]) <= tol else None


class StepTracker:
    """Finds the denoising loop's step from the pipeline's scheduler, shared by all denoisers of one pipeline
    (Wan 2.2's two experts agree on the index because both read the same scheduler)."""

    def __init__(self, pipe=None):
        self._pipe = weakref.ref(pipe) if pipe is not None else None

    @property
    def pipe(self):
        return self._pipe() if self._pipe is not None else None

    def loop_step(self, timestep: float | None) -> tuple[int | None, int | None]:
        """(index in the denoising loop, length of the loop) for a forward at ``timestep``.

        The loop runs over ``scheduler.timesteps[begin:]``: ``begin`` is the scheduler's ``begin_index`` (set by
        img2img-style pipelines), else what the pipeline's ``_num_timesteps`` (the loop length, set before the
        loop) leaves of the schedule. The position in the schedule is the scheduler's own ``step_index`` (one per
        model evaluation, so Heun's repeated timesteps count apart), PNDM's ``counter``, or the timestep's place
        in the loop's timesteps.
        """
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None, None
        total = len(timesteps)
        num = _int_attr(pipe, "_num_timesteps")
        if num is not None and not 0 < num <= total:
            num = None
        begin = _int_attr(scheduler, "begin_index")
        if begin is None or not 0 <= begin < total:
            begin = total - num if num is not None else 0
        if num is None:
            num = total - begin
        position = _int_attr(scheduler, "step_index")
        if position is None and not hasattr(type(scheduler), "step_index"):
            position = _int_attr(scheduler, "counter")  # PNDM: one count per step() call
        if position is None and timestep is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()[begin:]
            found = _match(ts, timestep)
            position = None if found is None else begin + found
        if position is None or not 0 <= position - begin < num:
            return None, num
        return position - begin, num

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
    """Hands the denoiser's :class:`DenoiserContext` resolvers for the layout and step before each forward, and
    clears it after.

    ``patched`` lists ``(module, processor)`` for every attention module ``apply`` patched. A diffusers call that
    replaces processors after ``apply`` (``fuse_qkv_projections``, ``enable_attention_slicing``,
    ``set_attn_processor``) would switch the method off silently; before each forward the hook hands every
    replaced processor to ``rewrap``, which puts the method back around it.
    """

    _is_stateful = True

    def __init__(self, family: Family, context: DenoiserContext, tracker: StepTracker, params: tuple[str, ...],
                 patched: list | None = None, rewrap: Callable | None = None):
        super().__init__()
        self.family = family
        self.context = context
        self.tracker = tracker
        self.params = params  # the forward's parameter names after ``self``, for binding positional arguments
        self.patched = patched or []
        self.rewrap = rewrap
        self.created_registry = False
        self.cache = StateManager(_NoState)  # diffusers' cache_context() writes the CacheContext here

    def pre_forward(self, module, *args, **kwargs):
        for i, (attn, proc) in enumerate(self.patched):
            if attn.processor is not proc:
                self.patched[i] = (attn, self.rewrap(attn, proc))
        bound = dict(zip(self.params, args))
        bound.update(kwargs)
        cache = cache_context(self.cache)
        self.context.begin(lambda: self._layout(module, bound, cache), lambda: self._step(bound, cache))
        return args, kwargs

    # Run only when a method asks. Under torch.compile they stay out of the graph (reading the pipeline's state from
    # traced code would guard on it and recompile every step).
    @torch.compiler.disable
    def _layout(self, module, bound: dict, cache) -> tuple[TokenLayout, int | None]:
        if parallel_config(module) is not None and ROOT_SPLIT_HOOK in hooks_after(module, HOOK_NAME):
            raise ContextParallelError(
                f"attnproc: {type(module).__name__}.enable_parallelism was called after attnproc.apply, so diffusers "
                "shards the forward's inputs before attnproc's step hook reads the token layout; call "
                "enable_parallelism(...) first, then attnproc.apply(...)")
        grid, text_valid = self.family.grid_of(module, bound)
        branches, _ = self._branches(cache, _batch_size(bound))
        return TokenLayout(*grid, branches=branches), text_valid

    @torch.compiler.disable
    def _step(self, bound: dict, cache) -> StepContext:
        t = _scalar_timestep(bound.get("timestep"))
        timestep = None if t is None else t * self.family.timestep_scale
        index, num = self.tracker.loop_step(timestep)
        if cache is not None and cache.step_index is not None:
            index = cache.step_index
            num = cache.num_inference_steps or num
        _, branch = self._branches(cache, _batch_size(bound))
        return StepContext(index=index, num_steps=num, timestep=float("nan") if timestep is None else timestep,
                           branch=branch, denoiser=self.context.denoiser)

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


def forward_params(model: torch.nn.Module) -> tuple[str, ...]:
    """The names of ``model.forward``'s parameters after ``self`` (read once, outside any compiled region)."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def install(model: torch.nn.Module, hook: StepHook) -> None:
    hook.created_registry = getattr(model, "_diffusers_hook", None) is None
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(hook, HOOK_NAME)


def installed(model: torch.nn.Module) -> StepHook | None:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.hooks.get(HOOK_NAME)


def uninstall(model: torch.nn.Module) -> bool:
    """Remove our hook; if that leaves the registry we created empty, drop it and the forward wrapper too."""
    hook = installed(model)
    if hook is None:
        return False
    registry = model._diffusers_hook
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks:
        bound = model.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(model).forward:
            del model.forward
        if hook.created_registry:
            del model._diffusers_hook
    return True
