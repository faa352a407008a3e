"""Public entry points: apply, remove, processor."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._compat import parallel_config
from .context import DenoiserContext
from .errors import AttnprocError
from .families import Family, attention_modules, family_named, family_of
from .layout import TokenLayout
from .method import Method
from .parallel import mode_of
from .processor import STATE_ATTR, AttnProcessor, BlockInput, ModuleInfo, fresh_stock
from .registry import REGISTRY

DENOISERS = ("unet", "transformer", "transformer_2")


class AlreadyPatchedError(AttnprocError, RuntimeError):
    """apply() on a pipeline that already carries attnproc processors."""


@dataclass(frozen=True)
class DenoiserPatch:
    """What apply() did to one denoiser."""

    family: str
    patched: tuple[str, ...]  # attention modules now running the method
    skipped: tuple[str, ...]  # attention modules left stock (e.g. text-refiner attention)


@dataclass
class Handle:
    """Returned by :func:`apply`: the method, its validated config and what was patched. ``remove()`` undoes it."""

    method: Method
    denoisers: dict[str, DenoiserPatch]
    _target: Any = field(repr=False, default=None)
    _contexts: dict[str, DenoiserContext] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def config(self):
        return self.method.config

    @property
    def num_patched(self) -> int:
        return sum(len(d.patched) for d in self.denoisers.values())

    def remove(self) -> bool:
        return remove(self._target)

    def states(self) -> dict[str, torch.nn.Module]:
        """The method's per-module state (see ``Method.create_state``) by ``"<denoiser>.<module name>"``."""
        out = {}
        for den, model in _denoisers(self._target):
            for mod_name, module in attention_modules(model):
                state = getattr(module, STATE_ATTR, None)
                if isinstance(state, torch.nn.ModuleDict) and _ours(module) is not None:
                    out[f"{den}.{mod_name}"] = state
        return out

    def parameters(self):
        """The parameters of every per-module state, for an optimizer."""
        for state in self.states().values():
            yield from state.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every per-module state tensor, keyed as in the denoiser's own ``state_dict`` with the denoiser's name
        in front: ``"transformer.blocks.0.attn1.attnproc.<method>.<tensor>"``."""
        return {f"{name}.{STATE_ATTR}.{key}": t for name, state in self.states().items() for key, t in state.state_dict().items()}

    def last_layouts(self) -> dict[str, TokenLayout | None]:
        """The full-resolution layout each denoiser saw in its most recent forward (for reports)."""
        return {name: ctx.last_layout for name, ctx in self._contexts.items()}

    def __str__(self) -> str:
        parts = [f"{n}: {d.family}, {len(d.patched)} attention modules" + (
            f" ({len(d.skipped)} left stock)" if d.skipped else "") for n, d in self.denoisers.items()]
        return f"attnproc {self.name!r} on " + "; ".join(parts)


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``torch.compile`` wrapper (``OptimizedModule``): processors and hooks go on it, and the
    compiled wrapper picks them up on its next call."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, torch.nn.Module) else model


def _denoisers(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, torch.nn.Module):
        model = _uncompiled(target)
        return [(type(model).__name__, model)]
    found = [(n, getattr(target, n, None)) for n in DENOISERS]
    found = [(n, _uncompiled(m)) for n, m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise ValueError(f"{type(target).__name__} has no denoiser ({', '.join(DENOISERS)}); attnproc.apply takes a "
                         "diffusers pipeline or a denoiser model")
    return found


def _ours(module) -> AttnProcessor | None:
    proc = getattr(module, "processor", None)
    return proc if isinstance(proc, AttnProcessor) else None


def apply(pipe, method: str | list[str], **options) -> Handle:
    """Install ``method`` on every attention module of every denoiser of ``pipe``, plus the step/layout hooks.

    ``method`` is a registered name with its options as keywords, or a list composing a base method with
    steering edits, e.g. ``apply(pipe, ["radial", "maskmod"], radial={...}, maskmod={...})``. Options are
    validated before anything is touched, so an error leaves the pipeline as it was. ``pipe`` may also be a
    single denoiser model.
    """
    instance = create(method, **options)
    denoisers = _denoisers(pipe)
    families: dict[str, Family] = {name: family_of(model) for name, model in denoisers}
    for name, model in denoisers:
        for mod_name, module in attention_modules(model):
            ours = _ours(module)
            if ours is not None:
                raise AlreadyPatchedError(
                    f"{name}.{mod_name} already runs attnproc method {ours.method.name!r}; call "
                    "attnproc.remove(pipe) before applying another method")
            config = parallel_config(module.processor)
            if config is not None:  # enable_parallelism came first: the method must serve its mode
                instance.check_parallel(mode_of(config))

    from . import hooks  # diffusers' hook registry: imported here so `import attnproc` does not need diffusers

    instance.bind(pipe)
    tracker = hooks.StepTracker(None if isinstance(pipe, torch.nn.Module) else pipe)
    patches, contexts = {}, {}
    for name, model in denoisers:
        family = families[name]
        context = contexts[name] = DenoiserContext(family.name, name)
        patched, skipped, processors, layers, blocks = [], [], {}, {}, {}
        named = dict(model.named_modules()) if instance.needs_block_input else {}
        for mod_name, module in attention_modules(model):
            kind = family.kind_of(mod_name, module)
            if kind is None:
                skipped.append(mod_name)
                continue
            layer = layers.setdefault(mod_name.rsplit(".", 1)[0], len(layers))
            info = ModuleInfo(family, name, mod_name, len(patched), layer, kind)
            block = None
            if instance.needs_block_input:  # one forward-pre-hook per transformer block, removed by remove()
                block_name = family.block_name(mod_name)
                block = blocks.get(block_name) or blocks.setdefault(block_name, BlockInput().attach(named[block_name]))
            processors[mod_name] = AttnProcessor(instance, stock=module.processor, info=info, context=context,
                                                 block=block)
            patched.append(mod_name)
        modules = dict(attention_modules(model))
        for mod_name, proc in processors.items():
            modules[mod_name].set_processor(proc)
            proc.prepare(modules[mod_name], proc.info.kind)  # the method's per-module state, registered now
        installed = [(modules[mod_name], proc) for mod_name, proc in processors.items()]
        hooks.install(model, hooks.StepHook(family, context, tracker, hooks.forward_params(model), installed,
                                            _rewrap))
        patches[name] = DenoiserPatch(family.name, tuple(patched), tuple(skipped))
    return Handle(instance, patches, pipe, contexts)


def _rewrap(module, ours: AttnProcessor) -> AttnProcessor:
    """Put the method back on ``module`` after diffusers replaced its processor (``fuse_qkv_projections``,
    ``enable_attention_slicing``, ``set_attn_processor``): the new processor becomes the stock one we wrap, so the
    user's choice (fused projections, slicing) and the method both stay in force."""
    current = module.processor
    if isinstance(current, AttnProcessor) and current.method is None:  # rebuilt as cls() (load/unload_ip_adapter)
        current = fresh_stock(current, module, ours.info.family, ours.info.kind)
    elif isinstance(current, AttnProcessor):  # ours again (e.g. unfuse_qkv_projections restored the saved ones)
        return current
    wrapped = AttnProcessor(ours.method, stock=current, info=ours.info, context=ours.context, block=ours.block)
    module.set_processor(wrapped)
    wrapped.prepare(module, ours.info.kind)  # finds the state already registered on the module
    return wrapped


def _stock_of(proc):
    while isinstance(proc, AttnProcessor) and proc.stock is not None:
        proc = proc.stock
    return proc


def remove(pipe) -> bool:
    """Restore the stock processors and remove our hooks. Returns False (a no-op) if nothing was applied.

    Processors diffusers saved while ours were installed (``fuse_qkv_projections`` keeps them in
    ``original_attn_processors`` for ``unfuse_qkv_projections``) are replaced by the stock ones too, so a later
    unfuse cannot bring attnproc back.
    """
    from . import hooks

    removed = False
    methods: dict[int, Method] = {}
    for _, model in _denoisers(pipe):
        for mod_name, module in attention_modules(model):
            ours = _ours(module)
            if ours is not None and ours.method is not None:
                methods.setdefault(id(ours.method), ours.method)
            if ours is not None and ours.stock is not None:
                ours.detach(module)
                module.set_processor(_stock_of(ours))
                removed = True
            elif ours is not None and ours.method is None:  # a cls() placeholder no forward has replaced yet
                family = family_of(model)
                module.set_processor(fresh_stock(ours, module, family, family.kind_of(mod_name, module)))
                removed = True
        saved = getattr(model, "original_attn_processors", None)
        if isinstance(saved, dict) and any(isinstance(p, AttnProcessor) for p in saved.values()):
            model.original_attn_processors = {name: _stock_of(p) for name, p in saved.items()}
            removed = True
        removed = hooks.uninstall(model) or removed
    for method in methods.values():  # what bind added outside the modules (a concept's token)
        method.unbind(pipe)
    return removed


def processor(method: str, *, family: str | None = None, layout: TokenLayout | None = None,
              **options) -> AttnProcessor:
    """A processor for diffusers' own ``model.set_attn_processor(...)``.

    Without our hooks it knows neither layout nor step: methods that need them fail on the first call with a
    message saying what to do, unless ``layout`` (the full-resolution visual grid of the calls to come) and
    ``family`` (e.g. ``"wan"``; aliases such as ``"wan21"`` are accepted) are given. ``family`` also picks the stock processor for legacy ``Attention``
    modules whose processor cannot be told from the module alone (SD3, HunyuanVideo, CogVideoX, Qwen-Image).
    """
    fam = family_named(family) if family is not None else None
    if layout is not None and not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be an attnproc.TokenLayout, got {type(layout).__name__}")
    instance = REGISTRY.create(method, **options)
    instance.check_family(fam.name if fam is not None else None)
    return AttnProcessor(instance, info=ModuleInfo(fam, None, None, None, None, None), layout=layout)


def create(method: str | list[str], **options) -> Method:
    """A validated method instance (or a composition, for a list of names), as ``apply`` would install it;
    for interfaces that validate options or draw a method's mask without a pipeline."""
    if isinstance(method, (list, tuple)):
        return REGISTRY.create_many(method, options)
    return REGISTRY.create(method, **options)
