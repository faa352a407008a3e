"""Sparse attention methods (each registers itself on import)."""
from . import gna, radial  # noqa: F401
