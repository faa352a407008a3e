"""Method: the one interface every attention method implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnproc.kernels import dense_attention
from .errors import BlockInputUnavailableError, ContextParallelError, UnsupportedFamilyError
from .site import Site


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """One attention method: ``attention(q, k, v, site)`` with ``[B, H, S, D]`` tensors.

    Subclasses set ``name``, ``summary`` and ``Config`` (a dataclass made with :func:`attnproc.options.option`)
    and implement :meth:`attention`. One instance serves every attention module of a pipeline; what differs per
    module (parameters, buffers) lives in the module state made by :meth:`create_state`.

    Capabilities are class data, read by the processor and the interfaces (never tested by name):

    * ``needs_layout``: cannot run without the call's token layout;
    * ``needs_block_input``: reads ``site.inputs.block_input`` (``apply`` then hooks each transformer block);
    * ``needs_call_inputs``: reads ``site.module`` and ``site.inputs`` (the module's projections, the text
      context), which attnproc's diffusers processor gives and ComfyUI's attention override (q, k, v) does not;
    * ``families``: the model families served (``None``: every family), checked at ``bind``;
    * ``sdpa_extras``: the SDPA options honoured beyond ``attn_mask``/``scale`` (``dropout_p``, ``is_causal``,
      ``enable_gqa``); a call using another one is refused;
    * ``computes_output``: may compute a whole attention module's output itself (:meth:`module_output`), for
      methods that change more than the SDPA call (AgentSD merges tokens before the projections);
    * ``context_parallel``: the diffusers context-parallel modes it runs exactly under (``"ulysses"``: the whole
      sequence for a subset of heads, ``site.heads`` their global indices; ``"ring"``: the method is softmax
      attention under the static mask :meth:`ring_mask`, so a rank attends only the key shards and tiles that mask
      keeps for its queries). Empty: refused under ``enable_parallelism`` (docs/context_parallel.md).
    * ``needs_prompt_batch``: reads a batch whose images have different prompts (isolate: the references, then
      the scene), which ComfyUI's conditioning (one prompt for the whole batch) does not give.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    needs_layout: ClassVar[bool] = False
    needs_block_input: ClassVar[bool] = False
    needs_call_inputs: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...] | None] = None
    sdpa_extras: ClassVar[frozenset[str]] = frozenset()
    computes_output: ClassVar[bool] = False
    context_parallel: ClassVar[frozenset[str]] = frozenset()
    needs_prompt_batch: ClassVar[bool] = False

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def check_parallel(self, mode: str) -> None:
        """Raise :class:`ContextParallelError` unless this method (with its options) runs exactly under diffusers
        context parallelism in ``mode`` (``"ulysses"`` or ``"ring"``). Called by ``apply`` and the processor."""
        if mode in self.context_parallel:
            return
        served = sorted(self.context_parallel)
        hint = ("use ContextParallelConfig(ulysses_degree=N) instead: under Ulysses each rank attends the whole "
                "sequence for a subset of heads" if "ulysses" in served else
                "run it without enable_parallelism (or with method 'dense')")
        raise ContextParallelError(
            f"method {self.name!r} does not support diffusers context parallelism in {mode} mode (it supports "
            f"{served or 'none'}); {hint}. See docs/context_parallel.md")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site, *,
                  attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def ring_mask(self, site: Site, q_len: int, k_len: int,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Methods declaring ``"ring"``: the mask under which this call is plain softmax attention, over the
        whole unsharded call at ``site`` (``q_len`` x ``k_len``; ``attn_mask``: the call's key mask, in that order),
        as an :class:`attnproc.ring.BlockPattern` (``BlockPattern.of_tokens(bool_mask)`` for a token mask), or
        ``None`` for every pair (dense). It must not depend on the keys' values."""
        return None

    def module_output(self, site: Site) -> torch.Tensor | None:
        """Methods with ``computes_output``: the attention module's output (what its stock processor returns)
        computed from ``site.module`` and ``site.inputs``, or ``None`` to run the stock processor with its SDPA
        call routed to :meth:`attention` as usual. Called once per processor call, before the stock processor."""
        return None

    def bind(self, target) -> None:
        """Called by ``attnproc.apply`` with the pipeline (or model) before any processor is installed, for
        methods that read pipeline inputs (a tokenizer to find phrase tokens, say). Raise to refuse; the
        pipeline is then left untouched. The default refuses a denoiser of a family not in ``families``."""
        from .families import denoiser_families

        for family, _ in denoiser_families(target):
            self.check_family(family)

    def unbind(self, target) -> None:
        """Undo what :meth:`bind` added to the pipeline outside the attention modules (a concept's token in
        the tokenizer, say); ``attnproc.remove`` calls it once per installed method. The default does nothing."""

    def check_family(self, family: str | None) -> None:
        """Raise :class:`UnsupportedFamilyError` unless this method serves ``family``."""
        if self.families is None or family in self.families:
            return
        from .families import describe_families

        supported = describe_families(self.families)
        if family is None:
            raise UnsupportedFamilyError(
                f"method {self.name!r} needs to know the model family; pass family=... to attnproc.processor() "
                f"or use attnproc.apply(pipe, {self.name!r}). Supported families: {supported}")
        from .families import FAMILIES

        title = f" ({FAMILIES[family].title})" if family in FAMILIES else ""
        raise UnsupportedFamilyError(f"method {self.name!r} does not support the model family {family!r}{title}; "
                                     f"supported families: {supported}")

    def create_state(self, site: Site) -> torch.nn.Module | None:
        """This method's state for one attention module (``site`` has no layout or step yet), or ``None``.

        A module returned here is registered on the attention module (so it is in the denoiser's
        ``state_dict`` under ``<module name>.attnproc.<method name>``, moves with ``.to()`` and is among its
        ``parameters()`` for an optimizer) and handed back on every call as ``self.module_state(site)``."""
        return None

    def module_states(self, site: Site) -> dict[str, torch.nn.Module]:
        """``{method name: state}`` for every method in this one (a composition has several)."""
        state = self.create_state(site)
        return {} if state is None else {self.name: state}

    def module_state(self, site: Site) -> torch.nn.Module | None:
        """This method's state at the call's module (made by :meth:`create_state`)."""
        return site.state[self.name] if self.name in site.state else None

    def block_input(self, site: Site) -> torch.Tensor:
        """The hidden states entering the transformer block of this call (methods with ``needs_block_input``)."""
        x = site.inputs.block_input if site.inputs is not None else None
        if x is None:
            raise BlockInputUnavailableError(
                f"method {self.name!r} needs the transformer block's input, which only attnproc.apply(pipe, "
                f"{self.name!r}) captures (a forward-pre-hook per block); plain set_attn_processor cannot give it")
        return x

    def token_mask(self, site: Site, q_len: int, k_len: int) -> torch.Tensor | None:
        """This method's attention pattern at ``site`` as a bool ``[H or 1, q_len, k_len]`` mask (True = kept),
        or ``None`` if it keeps every pair. Edits that materialise scores use it to keep the sparsity."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class Edit(Method):
    """An attention-steering edit: changes one attention call and delegates the rest to ``inner`` (dense when
    the edit is used alone, the sparse method when composed with one in ``attnproc.apply``)."""

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return self.edit(q, k, v, site, inner=_DENSE, attn_mask=attn_mask, scale=scale)

    def edit(self, q, k, v, site, *, inner: Method, attn_mask=None, scale=None) -> torch.Tensor:
        raise NotImplementedError


class Composed(Method):
    """A base method with edits applied in order around it: ``edits[-1](… edits[0](base))``."""

    name = "composed"
    summary = "A base method with steering edits around it."

    def __init__(self, base: Method, edits: list[Edit]):
        super().__init__(None)
        self.base, self.edits = base, list(edits)
        parts = [base, *self.edits]
        self.name = "+".join(m.name for m in parts)
        self.needs_layout = any(m.needs_layout for m in parts)
        self.needs_block_input = any(m.needs_block_input for m in parts)
        self.needs_prompt_batch = any(m.needs_prompt_batch for m in parts)
        self.needs_call_inputs = any(m.needs_call_inputs for m in parts)
        served = [set(m.families) for m in parts if m.families is not None]
        self.families = tuple(sorted(set.intersection(*served))) if served else None
        self.sdpa_extras = frozenset()  # edits see only attn_mask and scale
        self.context_parallel = frozenset.intersection(*(m.context_parallel for m in parts))
        chain: Method = base
        for edit in self.edits:  # built once: the outermost edit is called first
            chain = _Wrapped(edit, chain)
        self._chain = chain

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return self._chain.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)

    def bind(self, target) -> None:
        for m in [self.base, *self.edits]:
            m.bind(target)

    def check_parallel(self, mode: str) -> None:
        for m in [self.base, *self.edits]:
            m.check_parallel(mode)
    def unbind(self, target) -> None:
        for m in [self.base, *self.edits]:
            m.unbind(target)

    def module_states(self, site):
        return {n: s for m in [self.base, *self.edits] for n, s in m.module_states(site).items()}

    def token_mask(self, site, q_len, k_len):
        return self.base.token_mask(site, q_len, k_len)

    def __repr__(self) -> str:
        return f"Composed({self.base!r}, {self.edits!r})"


class _Wrapped(Method):
    """One edit around an inner method, seen as a method."""

    def __init__(self, edit: Edit, inner: Method):
        super().__init__(edit.config)
        self.edit_, self.inner = edit, inner
        self.name = edit.name

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return self.edit_.edit(q, k, v, site, inner=self.inner, attn_mask=attn_mask, scale=scale)

    def token_mask(self, site, q_len, k_len):
        return self.inner.token_mask(site, q_len, k_len)

    def __repr__(self) -> str:
        return f"_Wrapped({self.edit_!r} around {self.inner!r})"


class _Dense(Method):
    name = "dense"
    summary = "dense attention"

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_DENSE = _Dense()
