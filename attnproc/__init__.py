"""attnproc: attention processors for diffusers, swapped into stock pipelines by one registry.

    handle = attnproc.apply(pipe, "radial", dense_first_steps=0.24)
    attnproc.remove(pipe)
"""
from .api import AlreadyPatchedError, Handle, apply, processor, remove
from .context import StepContext
from .families import UnsupportedModelError
from .layout import TokenLayout
from .method import Composed, Edit, Method, SparseMethod
from .options import OptionError, option
from .registry import MethodInfo, UnknownMethodError, methods, register
from .schedule import Schedule
from .site import Site

from . import dense, sparse, steer  # noqa: E402,F401  (importing registers the built-in methods)

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "processor", "methods", "register", "Method", "SparseMethod", "Edit", "Composed", "Schedule", "Site",
    "TokenLayout", "StepContext", "Handle", "MethodInfo", "option", "OptionError", "UnknownMethodError",
    "UnsupportedModelError", "AlreadyPatchedError",
]
