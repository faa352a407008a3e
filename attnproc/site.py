"""Site: everything a method may know about the attention call it is serving."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args

import torch

from .context import StepContext
from .errors import LayoutUnavailableError
from .layout import TokenLayout

Kind = Literal["self", "cross", "joint"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class CallInputs:
    """The stock processor's inputs for this call (what the attention module got), for methods that need more
    than q, k, v: ``encoder_hidden_states`` (text context; ``None`` in pure self-attention), the processor's
    ``attention_mask``, ``temb``, ``image_rotary_emb``, and ``block_input`` (the hidden states entering the
    transformer block that owns this module; only when the method sets ``needs_block_input``)."""

    hidden_states: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    temb: torch.Tensor | None = None
    image_rotary_emb: Any = None
    block_input: torch.Tensor | None = None


@dataclass(frozen=True)
class Site:
    """Where an attention call is: model family, module, kind, token layout and denoising step.

    ``index`` counts the denoiser's patched attention modules in order; ``layer`` counts its blocks (the
    modules' parents: Wan's ``blocks.3.attn1`` and ``blocks.3.attn2`` are both layer 3). ``call`` counts the
    SDPA calls inside one processor call (Wan I2V makes two: text, then image context).

    ``base_layout`` is the denoiser forward's layout at full resolution (the latent grid); it differs from
    ``layout`` only in multiscale families (UNet), where ``layout`` is the grid of the module's level.

    ``layout`` and ``step`` are ``None`` when the processor runs without our hooks (plain
    ``set_attn_processor`` without an explicit layout). ``inputs`` holds the processor's inputs, ``state`` the
    per-module state of the method(s) (``{method name: nn.Module}``, see ``Method.create_state``).

    ``heads`` are the global indices of the heads in this call's ``q`` (Ulysses context parallelism hands each
    rank a range of them), or ``None`` when the call holds every head; see :meth:`global_heads`.
    """

    family: str | None
    denoiser: str | None
    name: str | None
    index: int | None
    layer: int | None
    kind: Kind
    layout: TokenLayout | None
    step: StepContext | None
    module: Any = field(default=None, compare=False)
    call: int = 0
    inputs: CallInputs | None = field(default=None, compare=False, repr=False)
    state: Mapping[str, torch.nn.Module] = field(default_factory=dict, compare=False, repr=False)
    base_layout: TokenLayout | None = None
    heads: range | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Site.kind must be one of {KINDS}, got {self.kind!r}")

    def global_heads(self, num: int) -> range:
        """The global head index of each of the call's ``num`` heads (per-head choices must use these)."""
        return self.heads if self.heads is not None else range(num)

    def require_layout(self, method: str) -> TokenLayout:
        if self.layout is None:
            raise LayoutUnavailableError(
                f"method {method!r} needs the token layout of each attention call, which plain "
                "set_attn_processor cannot give. Use attnproc.apply(pipe, "
                f"{method!r}, ...), or pass layout=attnproc.TokenLayout(frames, height, width, ...) and "
                "family=... to attnproc.processor().")
        return self.layout



def _resolved(index: int) -> property:
    def read(self):
        if "_value" not in self.__dict__:
            object.__setattr__(self, "_value", self._resolve())
        return self.__dict__["_value"][index]

    def written(self, value):  # only Site.__init__ writes (placeholders); the values come from ``resolve``
        pass
    return property(read, written)


class LazySite(Site):
    """A :class:`Site` whose ``layout``, ``step`` and ``base_layout`` are worked out on first read.

    The processor makes these under ``torch.compile``: a method that reads neither (``dense``) then never reaches
    the hooks' resolvers (which run outside the graph), so it adds no graph break. Read them during the call: the
    forward's context is gone after it. ``resolve()`` returns ``(layout, step, base_layout)``; without it
    (``dataclasses.replace``) the given values are used.
    """

    def __init__(self, resolve=None, *, layout=None, step=None, base_layout=None, **fields):
        if resolve is None:
            value = (layout, step, base_layout)
            resolve = lambda: value  # noqa: E731
        object.__setattr__(self, "_resolve", resolve)
        Site.__init__(self, layout=None, step=None, base_layout=None, **fields)

    layout = _resolved(0)
    step = _resolved(1)
    base_layout = _resolved(2)
