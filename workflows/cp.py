"""``--cp ulysses=N`` / ``--cp ring=N``: one generation split across the processes of a ``torchrun`` /
``accelerate launch`` with diffusers' context parallelism (docs/context_parallel.md).

Every process of the launch joins the one context-parallel group (the degree must equal the number of
processes): each renders the same job on its shard of the sequence, and only the main process writes outputs.
The denoiser's ``enable_parallelism`` is called before attnproc applies a method, the order attnproc needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["CPSpec", "parse_cp", "enable_context_parallel"]

MODES = ("ulysses", "ring")
DENOISERS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class CPSpec:
    """A context-parallel mode and degree, as ``--cp`` gives them."""

    mode: str
    degree: int

    def __str__(self) -> str:
        return f"{self.mode}={self.degree}"

    def config(self):
        """diffusers' ``ContextParallelConfig`` for this spec."""
        from diffusers import ContextParallelConfig

        return ContextParallelConfig(**{f"{self.mode}_degree": self.degree})

    def check_world(self, world: int, option: str = "--cp") -> None:
        """Every process joins the one CP group: the degree must be the number of processes."""
        if world != self.degree:
            raise ValueError(f"{option} {self}: the launch has {world} process(es); the context-parallel degree must "
                             f"equal the number of processes (launch with torchrun --nproc-per-node {self.degree})")


def parse_cp(text: str | None) -> CPSpec | None:
    """``"ulysses=2"`` or ``"ring=4"`` -> :class:`CPSpec`; ``None`` or ``""`` -> ``None``."""
    if not text:
        return None
    mode, sep, degree = str(text).partition("=")
    mode = mode.strip().lower()
    if not sep or mode not in MODES or not degree.strip().isdigit() or int(degree) < 2:
        raise ValueError(f"--cp must be MODE=N with MODE one of {list(MODES)} and N >= 2 (the number of "
                         f"processes); got {text!r}")
    return CPSpec(mode, int(degree))


def _diffusers_enable(model, config) -> None:
    model.enable_parallelism(config=config)


def enable_context_parallel(pipe, spec: CPSpec, setup: Callable | None = None) -> list[str]:
    """Enable ``spec`` on every transformer denoiser of ``pipe`` (``setup(model, config)``, default diffusers'
    ``model.enable_parallelism(config=config)``); returns their names. UNets are refused (diffusers has no CP
    plan for them)."""
    setup = setup or _diffusers_enable
    names = [n for n in DENOISERS if getattr(pipe, n, None) is not None]
    if not names:
        raise ValueError(f"--cp {spec}: {type(pipe).__name__} has no transformer denoiser; diffusers' context "
                         "parallelism shards transformers (DiTs) only, not UNets")
    for name in names:
        setup(getattr(pipe, name), spec.config())
    return names
