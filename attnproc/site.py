"""Site: everything a method may know about the attention call it is serving."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .context import StepContext
from .layout import TokenLayout

KINDS = ("self", "cross", "joint")


@dataclass(frozen=True)
class Site:
    """Where an attention call is: model family, module, kind, token layout and denoising step.

    ``index`` counts the denoiser's patched attention modules in order; ``layer`` counts its blocks (the
    modules' parents: Wan's ``blocks.3.attn1`` and ``blocks.3.attn2`` are both layer 3).

    ``layout`` and ``step`` are ``None`` when the processor runs without our hooks (plain
    ``set_attn_processor`` without an explicit layout).
    """

    family: str | None
    denoiser: str | None
    name: str | None
    index: int | None
    layer: int | None
    kind: str
    layout: TokenLayout | None
    step: StepContext | None
    module: Any = None

    def require_layout(self, method: str) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError(
                f"method {method!r} needs the token layout of each attention call, which plain "
                "set_attn_processor cannot give. Use attnproc.apply(pipe, "
                f"{method!r}, ...), or pass layout=attnproc.TokenLayout(frames, height, width, ...) and "
                "family=... to attnproc.processor().")
        return self.layout
