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
