"""Method: the one interface every attention method implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnproc.kernels import dense_attention
from .schedule import Schedule
from .site import Site


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """One attention method: ``attention(q, k, v, site)`` with ``[B, H, S, D]`` tensors.

    Subclasses set ``name``, ``summary`` and ``Config`` (a dataclass made with :func:`attnproc.options.option`)
    and implement :meth:`attention`. One instance serves every attention module of a pipeline, so caches keyed
    by shape (static masks) are shared across layers.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    needs_layout: ClassVar[bool] = False

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site, *,
                  attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, target) -> None:
        """Called by ``attnproc.apply`` with the pipeline (or model) before any processor is installed, for
        methods that read pipeline inputs (a tokenizer to find phrase tokens, say). Raise to refuse; the
        pipeline is then left untouched."""

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
        self.needs_layout = base.needs_layout or any(e.needs_layout for e in edits)
        self.name = "+".join([base.name] + [e.name for e in edits])

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return self._layer(len(self.edits)).attention(q, k, v, site, attn_mask=attn_mask, scale=scale)

    def _layer(self, n: int) -> Method:
        return self.base if n == 0 else _Wrapped(self.edits[n - 1], self._layer(n - 1))

    def bind(self, target) -> None:
        for m in [self.base, *self.edits]:
            m.bind(target)

    def token_mask(self, site, q_len, k_len):
        return self.base.token_mask(site, q_len, k_len)

    def __repr__(self) -> str:
        return f"Composed({self.base!r}, {self.edits!r})"


class _Wrapped(Method):
    """One edit around an inner method, seen as a method."""

    def __init__(self, edit: Edit, inner: Method):
        self.edit_, self.inner = edit, inner
        self.name = edit.name

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return self.edit_.edit(q, k, v, site, inner=self.inner, attn_mask=attn_mask, scale=scale)

    def token_mask(self, site, q_len, k_len):
        return self.inner.token_mask(site, q_len, k_len)


class _Dense(Method):
    name = "dense"
    summary = "dense attention"

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_DENSE = _Dense()


class SparseMethod(Method):
    """A method that runs dense wherever its :class:`Schedule` says so and ``sparse_attention`` elsewhere.

    Its ``Config`` must derive from :class:`Schedule`. Calls with an attention mask (padded text) or a
    layout-less site also go dense, unless the subclass handles them.
    """

    Config: ClassVar[type] = Schedule
    needs_layout: ClassVar[bool] = True

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        if self.config.dense_here(site):
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        site.require_layout(self.name)
        return self.sparse_attention(q, k, v, site, attn_mask=attn_mask, scale=scale)

    def sparse_attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        raise NotImplementedError
