"""Step context and the per-denoiser context our hooks fill in and our processors read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .layout import TokenLayout


@dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is, for the forward pass in progress.

    ``index`` is the 0-based step (``None`` when the pipeline's scheduler cannot tell), ``timestep`` is in the
    scheduler's units, ``branch`` is ``"cond"``, ``"uncond"`` or ``"batched"`` (both halves in one batch).
    """

    index: int | None
    num_steps: int | None
    timestep: float
    branch: Literal["cond", "uncond", "batched"] | None = None
    denoiser: Literal["unet", "transformer", "transformer_2"] | str | None = None

    @property
    def progress(self) -> float | None:
        """Fraction of the loop done before this step, in [0, 1)."""
        if self.index is None or not self.num_steps:
            return None
        return self.index / self.num_steps


class DenoiserContext:
    """The layout and step of the forward pass running in one denoiser.

    One instance per patched denoiser, shared by its processors and written only by its step hook: there is no
    module-level state, so two pipelines (or two experts) never see each other's context.
    """

    def __init__(self, family: str, denoiser: str):
        self.family = family
        self.denoiser = denoiser
        self.layout: TokenLayout | None = None
        self.step: StepContext | None = None
        self.text_valid: int | None = None
        self.last_layout: TokenLayout | None = None  # kept after the forward, for reports
        self.last_step: StepContext | None = None

    def set(self, layout: TokenLayout, step: StepContext, text_valid: int | None) -> None:
        self.layout, self.step, self.text_valid = layout, step, text_valid
        self.last_layout, self.last_step = layout, step

    def clear(self) -> None:
        self.layout = None
        self.step = None
        self.text_valid = None
