"""Schedule: where a sparse method runs dense instead (shared by every sparse method)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import StepUnavailableError
from .options import option
from .site import Site


def _steps(value: float, num_steps: int) -> int:
    """A step option: a fraction of the loop when < 1, a count of steps when >= 1."""
    return int(round(value * num_steps)) if value < 1 else int(value)


@dataclass
class Schedule:
    """Dense warm-up and exclusions. Step options below 1 are fractions of the steps (so they scale with the
    step count); 1 and above are step counts."""

    dense_first_steps: float = option(0.0, low=0, high=10000,
                                      help="run dense for the first N steps (a value < 1 is a fraction of all steps)")
    dense_last_steps: float = option(0.0, low=0, high=10000,
                                     help="run dense for the last N steps (a value < 1 is a fraction of all steps)")
    dense_first_layers: int = option(0, low=0, high=10000,
                                     help="run dense in the first N layers (blocks) of each denoiser")
    dense_cross: bool = option(True, help="run cross-attention (text context) dense")
    min_tokens: int = option(0, low=0, high=10_000_000,
                             help="run dense when the visual sequence is shorter than this many tokens")

    def dense_here(self, site: Site) -> bool:
        """True if the schedule sends this call to dense attention."""
        if site.kind == "cross" and self.dense_cross:
            return True
        if site.layer is not None and site.layer < self.dense_first_layers:
            return True
        if site.layout is not None and site.layout.visual_len < self.min_tokens:
            return True
        step = site.step
        if step is not None and step.index is not None and step.num_steps:
            if step.index < _steps(self.dense_first_steps, step.num_steps):
                return True
            if step.index >= step.num_steps - _steps(self.dense_last_steps, step.num_steps):
                return True
        elif self.dense_first_steps or self.dense_last_steps:
            raise StepUnavailableError(
                "this method's schedule uses dense_first_steps/dense_last_steps, which needs the denoising step "
                "index; use attnproc.apply(pipe, ...) so our hook can supply it, or set both to 0")
        return False
