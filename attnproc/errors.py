"""Every error attnproc raises on purpose derives from :class:`AttnprocError`, so callers can catch ours alone.

Each one also derives from the builtin a caller would have caught before (``ValueError`` for bad input,
``RuntimeError`` for a state the call cannot run in), so existing ``except`` clauses keep working.
"""
from __future__ import annotations


class AttnprocError(Exception):
    """Base of attnproc's errors."""


class UnsupportedModelError(AttnprocError, ValueError):
    """A denoiser (or model family) attnproc, or the chosen method, does not serve."""


class UnsupportedFamilyError(UnsupportedModelError):
    """A method asked to run on a model family it does not support (or on an unknown family)."""


class LayoutUnavailableError(AttnprocError, RuntimeError):
    """A method needs the token layout of the call, and the processor runs without one."""


class StepUnavailableError(AttnprocError, RuntimeError):
    """A step-dependent option is set, and the call does not know its denoising step."""


class NonNativeBackendError(AttnprocError, RuntimeError):
    """The stock processor made no SDPA call (a non-native diffusers attention backend is selected)."""


class ContextParallelError(AttnprocError, RuntimeError):
    """Under diffusers context parallelism: a method, mode or setup attnproc cannot run exactly (it would see only
    one shard of the sequence or of the heads); the message names what works (docs/context_parallel.md)."""


class BlockInputUnavailableError(AttnprocError, RuntimeError):
    """A method needs the transformer block's input, which only ``attnproc.apply`` can capture."""


class UnsupportedCallError(AttnprocError, RuntimeError):
    """An attention call with SDPA options (``dropout_p``, ``is_causal``, ``enable_gqa``) the method does not
    declare in ``sdpa_extras``."""
