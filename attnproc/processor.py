"""AttnProcessor: a diffusers attention processor that runs the stock one with its attention call routed to a method.

The stock processor keeps doing the projections, norms, RoPE and output projection, so every family is served by
one class. While it runs, a scoped ``TorchFunctionMode`` hands its ``scaled_dot_product_attention`` call (legacy
processors call it directly, new-style ones through diffusers' native backend) to ``method.attention``. Nothing
in diffusers or torch is modified and the mode is active only inside ``__call__``.

Per attention module the processor also carries the method's state (an ``nn.ModuleDict`` registered on the
module as ``attnproc``) and, for methods that ask, the transformer block's input (:class:`BlockInput`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._compat import parallel_config
from .context import DenoiserContext
from .errors import ContextParallelError, NonNativeBackendError, UnsupportedCallError
from .families import Family, module_kind, stock_processor_for
from .layout import TokenLayout
from .method import Method
from . import parallel, ring
from .site import CallInputs, LazySite, Site

STATE_ATTR = "attnproc"  # the child of an attention module that holds the method's per-module state


@dataclass(frozen=True)
class ModuleInfo:
    """The static part of a site: known when the processor is installed."""

    family: Family | None
    denoiser: str | None
    name: str | None
    index: int | None
    layer: int | None
    kind: str | None


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"dropout_p": 0.0, "is_causal": False, "enable_gqa": False}


class _RouteAttention(TorchFunctionMode):
    """Sends SDPA calls made inside the ``with`` block to ``route(call_index, **sdpa)``; other ops run unchanged."""

    def __init__(self, route):
        super().__init__()
        self.route = route
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.route(self.calls - 1, **dict(zip(_SDPA_PARAMS, args)), **kwargs)
        if func is torch.Tensor.unflatten and torch.compiler.is_compiling():
            # dynamo cannot trace Tensor.unflatten's Python body (its super() call) under a mode; same op
            return torch.unflatten(*args, **kwargs)
        return func(*args, **kwargs)


def _accepted_kwargs(stock_cls: type) -> tuple[frozenset, bool]:
    params = inspect.signature(stock_cls.__call__).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(params), var_kw


def _sdpa_equivalent(stock: Any) -> Any | None:
    """diffusers' SDPA-calling twin of a stock processor that computes attention itself (``None``: no twin known).

    Custom Diffusion's twin shares the stock's trained layers (the same modules, not copies)."""
    from diffusers.models import attention_processor as ap

    if type(stock) in (ap.AttnProcessor, ap.SlicedAttnProcessor):
        return ap.AttnProcessor2_0()
    if type(stock) is ap.CustomDiffusionAttnProcessor:
        twin = ap.CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=stock.hidden_size,
                                                  cross_attention_dim=stock.cross_attention_dim)
        twin.train_kv, twin.train_q_out = stock.train_kv, stock.train_q_out
        for name, child in stock.named_children():
            setattr(twin, name, child)
        return twin
    return None


def _non_native_backend(stock: Any) -> str | None:
    """The non-native diffusers attention backend in force for ``stock``, if any."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = getattr(stock, "_attention_backend", None) or _AttentionBackendRegistry._active_backend
    return None if backend in (None, AttentionBackendName.NATIVE, "native") else str(backend)


class BlockInput:
    """The hidden states entering one transformer block, kept from its forward-pre-hook until its forward ends.

    ``attnproc.apply`` attaches one per block for methods with ``needs_block_input``; ``remove`` detaches it."""

    def __init__(self):
        self.value: torch.Tensor | None = None
        self._handles: list = []

    def attach(self, block: torch.nn.Module) -> "BlockInput":
        self._handles = [block.register_forward_pre_hook(self._enter, with_kwargs=True),
                         block.register_forward_hook(self._leave, always_call=True)]
        return self

    def _enter(self, block, args, kwargs):
        self.value = args[0] if args else kwargs.get("hidden_states")

    def _leave(self, block, args, output):
        self.value = None

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.value = [], None


class AttnProcessor:
    """Runs ``stock`` (the module's original processor) with its attention computed by ``method``.

    ``__call__`` takes new-style positional arguments through ``*args`` and names every keyword argument a
    supported stock processor takes beyond the common ones, because legacy ``Attention.forward`` drops keyword
    arguments the processor's signature does not name. Made around a ``stock``, the instance is of a subclass
    per stock class (:func:`_class_for`) whose ``__call__`` shows the stock's exact signature, so the adapters'
    extra keywords (``ip_adapter_masks``, ``ip_hidden_states``) reach it.

    ``AttnProcessor()`` without a method (what diffusers makes when it rebuilds processors as ``cls()``, e.g.
    ``load_ip_adapter``) is a placeholder: it runs the module's stock processor, and the step hook puts the
    method back before the next forward.
    """

    def __new__(cls, method: Method | None = None, *, stock: Any = None, **kwargs):
        if cls is AttnProcessor and stock is not None:
            cls = _class_for(type(stock))
        return super().__new__(cls)

    stock_class: type | None = None  # set on the per-stock-class subclasses
    # diffusers sets these on processors (set_attention_backend, enable_parallelism): we check them.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: Method | None = None, *, stock: Any = None, info: ModuleInfo | None = None,
                 context: DenoiserContext | None = None, layout: TokenLayout | None = None,
                 block: BlockInput | None = None):
        self.method = method
        self.stock = stock
        self.info = info or ModuleInfo(None, None, None, None, None, None)
        self.context = context
        self.layout = layout  # a fixed base layout for use without our hooks
        self.block = block
        self._stocks: dict[int, Any] = {}  # per module, when one instance was set on many modules
        self._states: dict[int, Any] = {}  # per module: the method's state (None: it has none)
        self._accepted: dict[type, tuple[frozenset, bool]] = {}  # per stock class: keywords its __call__ takes
        if stock is not None:  # read now, so a compiled forward does not trace inspect.signature
            self._accepted_by(stock)

    def __repr__(self) -> str:
        where = self.info.name or "unbound"
        name = self.method.name if self.method is not None else None
        return f"AttnProcessor({name!r} at {where}, stock={type(self.stock).__name__})"

    # ---- per-module state ------------------------------------------------------------------------------
    def prepare(self, attn: torch.nn.Module, kind: str) -> torch.nn.Module | None:
        """Create the method's state for ``attn`` (once) and register it as ``attn.attnproc``."""
        key = id(attn)
        if key in self._states:
            return self._states[key]
        states = getattr(attn, STATE_ATTR, None)
        if states is None:
            info = self.info
            site = Site(family=info.family.name if info.family else None, denoiser=info.denoiser, name=info.name,
                        index=info.index, layer=info.layer, kind=kind, layout=None, step=None, module=attn)
            made = self.method.module_states(site)
            if made:
                states = torch.nn.ModuleDict(made)
                attn.add_module(STATE_ATTR, states)
        self._states[key] = states
        return states

    def detach(self, attn: torch.nn.Module) -> None:
        """Undo :meth:`prepare` and the block hooks (``attnproc.remove``)."""
        if isinstance(getattr(attn, STATE_ATTR, None), torch.nn.ModuleDict):
            delattr(attn, STATE_ATTR)
        self._states.pop(id(attn), None)
        if self.block is not None:
            self.block.detach()

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, *args, image_rotary_emb=None, temb=None,
                 encoder_hidden_states_mask=None, **kwargs):
        plan = self._parallel_plan()
        context = args[0] if args else kwargs.get("encoder_hidden_states")
        kind = self.info.kind or module_kind(attn, self.info.family, context is not None)
        stock = self._stock_for(attn, kind)
        if plan is not None:  # the stock attends locally; our exchange (parallel.py) does the parallel part
            stock = self._local(stock)
        if kind is None or self.method is None:  # not attention over visual tokens, or a placeholder: stock as is
            given = {"image_rotary_emb": image_rotary_emb, "temb": temb,
                     "encoder_hidden_states_mask": encoder_hidden_states_mask}
            return stock(attn, hidden_states, *args, **kwargs, **{k: v for k, v in given.items() if v is not None})
        dense = self.method.name == "dense"
        if not dense:  # dense keeps the stock as is (bit for bit); other methods need its SDPA twin, if any
            stock = self._twin_for(stock) or stock
        accepted, var_kw = self._accepted_by(stock)
        for name, value in (("image_rotary_emb", image_rotary_emb), ("temb", temb),
                            ("encoder_hidden_states_mask", encoder_hidden_states_mask)):
            if value is not None:  # None is every stock processor's default
                kwargs[name] = value
        if not var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        inputs = CallInputs(
            hidden_states=hidden_states, encoder_hidden_states=context,
            attention_mask=args[1] if len(args) > 1 else kwargs.get("attention_mask"), temb=temb,
            image_rotary_emb=image_rotary_emb if image_rotary_emb is not None else (args[2] if len(args) > 2 else None),
            block_input=self.block.value if self.block is not None else None)
        states = self.prepare(attn, kind) or {}
        if self.method.computes_output:  # the method may compute the whole call (see Method.module_output)
            q_len = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
            ctx_len = context.shape[1] if context is not None and context.ndim == 3 else 0
            q_len += ctx_len if kind == "joint" else 0  # joint: the stock processor attends [visual, text] together
            kv_len = ctx_len if kind == "cross" else q_len
            out = self.method.module_output(self._site(attn, kind, q_len, kv_len, 0, inputs, states))
            if out is not None:
                return out
        route = _RouteAttention(lambda call, **sdpa: self._attend(attn, kind, call, inputs, states, plan, **sdpa))
        with route:
            out = stock(attn, hidden_states, *args, **kwargs)
        if route.calls == 0:
            backend = _non_native_backend(stock)
            if dense and backend is None and plan is None:  # computes attention itself: dense is its output
                return out
            cause = (f"the non-native attention backend {backend!r} is selected (set_attention_backend / "
                     "attention_backend / DIFFUSERS_ATTN_BACKEND); use the default 'native' backend with attnproc "
                     "processors" if backend else
                     f"{type(stock).__name__} computes attention itself and diffusers has no "
                     "scaled_dot_product_attention equivalent attnproc knows; set an SDPA processor (e.g. "
                     "AttnProcessor2_0) on this module before applying, or use method 'dense'")
            raise NonNativeBackendError(
                f"attnproc: the stock {type(stock).__name__} made no scaled_dot_product_attention call, so method "
                f"{self.method.name!r} could not run: {cause}.")
        return out

    def _accepted_by(self, stock) -> tuple[frozenset, bool]:
        spec = self._accepted.get(type(stock))
        if spec is None:
            spec = self._accepted[type(stock)] = _accepted_kwargs(type(stock))
        return spec

    def _twin_for(self, stock):
        """The SDPA twin of a stock processor that makes no SDPA call (made once per stock instance)."""
        key = ("twin", id(stock))
        if key not in self._stocks:
            self._stocks[key] = (stock, _sdpa_equivalent(stock))  # the stock kept alive so its id stays unique
        return self._stocks[key][1]

    def _parallel_plan(self) -> parallel.ParallelPlan | None:
        """The context-parallel plan in force (``enable_parallelism`` before or after ``apply``), checked against
        the method; ``None`` without context parallelism."""
        config = self._parallel_config or parallel_config(self.stock)
        if config is None:
            return None
        key = ("plan", id(config))
        if key not in self._stocks:
            if self.method is None or self.context is None or self.info.family is None:
                raise ContextParallelError(
                    "attnproc processors run under diffusers context parallelism only when installed by "
                    "attnproc.apply (the step hook gives the unsharded layout the exchange needs)")
            if self.info.family.multiscale:
                raise ContextParallelError(f"attnproc: context parallelism is not supported for the "
                                           f"{self.info.family.name!r} family (attention at several resolutions)")
            self.method.check_parallel(parallel.mode_of(config))
            plan = parallel.plan_of(config)
            self._stocks[key] = (config, plan)  # the config kept alive so its id stays unique
        return self._stocks[key][1]

    def _local(self, stock):
        """``stock`` without diffusers' parallel attention (a copy, made once), so its SDPA call sees the shard."""
        if parallel_config(stock) is None:
            return stock
        key = ("local", id(stock))
        if key not in self._stocks:
            local = copy.copy(stock)
            local._parallel_config = None
            self._stocks[key] = (stock, local)
        return self._stocks[key][1]

    def _stock_for(self, attn, kind):
        if self.stock is not None:
            return self.stock
        stock = self._stocks.get(id(attn))
        if stock is None:
            stock = self._stocks[id(attn)] = stock_processor_for(attn, self.info.family, kind)
        return stock

    # ---------------------------------------------------------------------------------------------------
    def _attend(self, attn, kind, call, inputs, states, plan, query, key, value, attn_mask=None, scale=None,
                **extra):
        if kind == "joint" and key.shape[-2] != query.shape[-2]:  # a joint module's extra call to other keys (Flux
            kind = "cross"  # IP-Adapter's image tokens): cross-attention of the visual queries
        extra = {k: v for k, v in extra.items() if v != _SDPA_DEFAULTS.get(k)}
        unsupported = sorted(set(extra) - self.method.sdpa_extras)
        if unsupported:
            raise UnsupportedCallError(f"method {self.method.name!r} does not support SDPA options {unsupported} "
                                      f"(it supports {sorted(self.method.sdpa_extras) or 'none'})")

        def run(q, k, v, mask, heads=None, q_len=None):  # q_len: the whole call's (Ring: q is one shard)
            site = self._site(attn, kind, q_len or q.shape[-2], k.shape[-2], call, inputs, states, heads)
            return self.method.attention(q, k, v, site, attn_mask=mask, scale=scale, **extra)

        if plan is None:
            return run(query, key, value, attn_mask)
        layout = self.context.layout
        if layout is None:
            raise ContextParallelError(f"attnproc: {self.info.name}: context parallelism needs the token layout, "
                                       f"which the {self.info.family.name} family cannot give for these inputs")
        common = dict(plan=plan, layout=layout, kind=kind, family=self.info.family, site_name=self.info.name, run=run)
        if plan.mode == "ulysses":
            return parallel.ulysses(query, key, value, attn_mask, **common)
        if extra:
            raise ContextParallelError(f"attnproc: {self.info.name}: SDPA options {sorted(extra)} are not supported "
                                       "under Ring context parallelism; use ulysses_degree=N")

        def pattern(q_len, k_len, key_mask):  # the method's static mask over the whole (unsharded) call
            site = self._site(attn, kind, q_len, k_len, call, inputs, states)
            return self.method.ring_mask(site, q_len, k_len, key_mask)

        return ring.ring(query, key, value, attn_mask, pattern=pattern, scale=scale, **common)

    def _context_layout(self) -> TokenLayout | None:
        """The forward's layout; ``None`` for a method that needs none when the family cannot lay the tokens out
        (Flux Kontext's reference tokens appended to the image's), so such a method still runs."""
        try:
            return self.context.layout
        except RuntimeError:
            if self.method.needs_layout:
                raise
            return None

    def _site(self, attn, kind, q_len, kv_len, call=0, inputs=None, states=None, heads=None) -> Site:
        info = self.info

        def resolve():
            base, step, text_valid = self.layout, None, None
            context_layout = self._context_layout() if self.context is not None else None
            if context_layout is not None:
                base, step, text_valid = context_layout, self.context.step, self.context.text_valid
            layout = None
            if base is not None and info.family is not None:
                layout = info.family.site_layout(base, kind, q_len, kv_len, text_valid)
            elif base is not None:
                layout = base
            return layout, step, base
        fields = dict(family=info.family.name if info.family else None, denoiser=info.denoiser, name=info.name,
                      index=info.index, layer=info.layer, kind=kind, module=attn, call=call, inputs=inputs,
                      state=states if states is not None else {}, heads=heads)
        if torch.compiler.is_compiling():  # read only if the method asks: no graph break for one that does not
            return LazySite(resolve, **fields)
        layout, step, base = resolve()  # eager: now, while this forward's context is current (sites may be kept)
        return Site(layout=layout, step=step, base_layout=base, **fields)


@lru_cache(maxsize=None)
def _class_for(stock_cls: type) -> type:
    """The :class:`AttnProcessor` subclass wrapping ``stock_cls``: same behaviour, the stock's ``__call__``
    signature (``Attention.forward`` passes on only the keywords it names)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return AttnProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = inspect.signature(stock_cls.__call__)
    name = f"AttnProcessor_{stock_cls.__name__}"
    __call__.__qualname__ = f"{name}.__call__"
    return type(name, (AttnProcessor,), {"__call__": __call__, "__module__": __name__, "__qualname__": name,
                                         "stock_class": stock_cls})


def fresh_stock(placeholder: AttnProcessor, module: torch.nn.Module, family: Family | None, kind: str | None):
    """What diffusers' ``value.__class__()`` would have made had the stock processor been installed: a fresh
    instance of the stock class, or the module's default stock processor when that class needs arguments (an
    IP-Adapter processor being unloaded)."""
    try:
        return placeholder.stock_class()
    except TypeError:
        return stock_processor_for(module, family, kind)
