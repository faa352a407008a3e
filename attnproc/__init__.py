"""attnproc: attention processors for diffusers, swapped into stock pipelines by one registry.

    handle = attnproc.apply(pipe, "radial", dense_first_steps=0.24)
    attnproc.remove(pipe)
"""
from .api import AlreadyPatchedError, Handle, apply, create, processor, remove
from .context import StepContext
from .errors import (AttnprocError, BlockInputUnavailableError, ContextParallelError, LayoutUnavailableError,
                     NonNativeBackendError, StepUnavailableError, UnsupportedCallError, UnsupportedFamilyError,
                     UnsupportedModelError)
from .layout import TokenLayout
from .method import Composed, Edit, Method
from .options import OptionError, option
from .registry import MethodInfo, UnknownMethodError, methods, register
from .schedule import Schedule
from .site import CallInputs, Site

from . import dense, sparse, steer  # noqa: E402,F401  (importing registers the built-in methods)
from .sparse import SparseMethod  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "processor", "create", "methods", "register", "Method", "SparseMethod", "Edit", "Composed",
    "Schedule", "Site", "CallInputs", "TokenLayout", "StepContext", "Handle", "MethodInfo", "option",
    "AttnprocError", "OptionError", "UnknownMethodError", "UnsupportedModelError", "UnsupportedFamilyError",
    "AlreadyPatchedError", "LayoutUnavailableError", "StepUnavailableError", "NonNativeBackendError",
    "ContextParallelError", "UnsupportedCallError", "BlockInputUnavailableError",
]
