"""Step context and the per-denoiser context our hooks fill in and our processors read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from .layout import TokenLayout


@dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is, for the forward pass in progress.

    ``index`` is the 0-based step of the pipeline's denoising loop, the ``i`` its step-end callbacks see (one per
    model evaluation: a Heun step counts twice; an img2img run with ``strength < 1`` starts at 0), and
    ``num_steps`` is the length of that loop. ``index`` is ``None`` when the pipeline's scheduler cannot tell.
    ``timestep`` is in the scheduler's units, ``branch`` is ``"cond"``, ``"uncond"`` or ``"batched"``.
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

    The hook hands over resolvers, not values: the layout and the step are worked out on first read. A method
    that reads neither (``dense``) costs nothing per forward, cannot fail on a layout it does not need, and
    under ``torch.compile`` adds no graph break or per-step recompile.
    """

    def __init__(self, family: str, denoiser: str):
        self.family = family
        self.denoiser = denoiser
        self._layout_of: Callable[[], tuple[TokenLayout, int | None]] | None = None
        self._step_of: Callable[[], StepContext] | None = None
        self._layout: TokenLayout | None = None
        self._text_valid: int | None = None
        self._step: StepContext | None = None
        self._last_layout_of = None
        self._last_layout: TokenLayout | None = None
        self.last_step: StepContext | None = None

    # ---- written by the hook -----------------------------------------------------------------------------
    def begin(self, layout_of: Callable[[], tuple[TokenLayout, int | None]],
              step_of: Callable[[], StepContext]) -> None:
        """A forward starts: ``layout_of()`` gives (layout, valid text length), ``step_of()`` the step."""
        self.clear()
        self._layout_of, self._step_of = layout_of, step_of
        self._last_layout_of, self._last_layout = layout_of, None

    def set(self, layout: TokenLayout, step: StepContext, text_valid: int | None) -> None:
        """Set known values directly (tests, callers without a hook)."""
        self.clear()
        self._layout, self._step, self._text_valid = layout, step, text_valid
        self._last_layout_of, self._last_layout, self.last_step = None, layout, step

    def clear(self) -> None:
        self._layout_of = self._step_of = None
        self._layout = self._step = self._text_valid = None

    # ---- read by the processors --------------------------------------------------------------------------
    def _resolve_layout(self) -> None:
        if self._layout_of is not None:
            layout_of, self._layout_of = self._layout_of, None
            self._layout, self._text_valid = layout_of()
            self._last_layout_of, self._last_layout = None, self._layout

    @property
    def layout(self) -> TokenLayout | None:
        self._resolve_layout()
        return self._layout

    @property
    def text_valid(self) -> int | None:
        self._resolve_layout()
        return self._text_valid

    @property
    def step(self) -> StepContext | None:
        if self._step_of is not None:
            step_of, self._step_of = self._step_of, None
            self._step = self.last_step = step_of()
        return self._step

    @property
    def last_layout(self) -> TokenLayout | None:
        """The layout of the most recent forward (for reports), worked out now if no method read it."""
        if self._last_layout_of is not None:
            layout_of, self._last_layout_of = self._last_layout_of, None
            self._last_layout = layout_of()[0]
        return self._last_layout
