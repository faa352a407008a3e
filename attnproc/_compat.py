"""The only place attnproc reads diffusers' private attributes; each access notes the versions it was checked on.

When diffusers renames one of these, this file is the one to change (the tests of the step hook and of the
context-parallel refusal fail first).
"""
from __future__ import annotations

from typing import Any


def cache_context(state_manager) -> Any:
    """The ``CacheContext`` (``name``, ``step_index``, ``num_inference_steps``) diffusers' ``cache_context()``
    has set on a hook's ``StateManager``, or ``None``. ``StateManager.context`` raises when unset, so we read
    ``_context`` (diffusers 0.35 - 0.42)."""
    return getattr(state_manager, "_context", None)


def parallel_config(processor) -> Any:
    """The context-parallel config diffusers' ``enable_parallelism`` sets on every attention processor as
    ``_parallel_config`` (diffusers 0.35 - 0.42), or ``None``."""
    return getattr(processor, "_parallel_config", None)


def cp_settings(config) -> tuple[int, int, bool]:
    """``(ring_degree, ulysses_degree, ragged)`` of a diffusers ``ParallelConfig`` (its public
    ``context_parallel_config``; ``ragged``: ``ulysses_anything`` or ``ring_anything``, diffusers 0.36 - 0.42)."""
    cp = config.context_parallel_config
    ragged = bool(getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False))
    return int(cp.ring_degree), int(cp.ulysses_degree), ragged


def cp_group(config, mode: str):
    """The process group of the ``"ring"`` or ``"ulysses"`` mesh dimension that ``ContextParallelConfig.setup``
    records as ``_ring_mesh`` / ``_ulysses_mesh`` (diffusers 0.36 - 0.42)."""
    cp = config.context_parallel_config
    mesh = cp._ring_mesh if mode == "ring" else cp._ulysses_mesh
    return mesh.get_group()


def hooks_after(model, name: str) -> list[str]:
    """The names of the diffusers hooks registered on ``model`` after hook ``name`` (they run before it: each
    registration wraps the forward so far); read from ``HookRegistry._hook_order`` (diffusers 0.32 - 0.42)."""
    registry = getattr(model, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    return order[order.index(name) + 1:] if name in order else []
