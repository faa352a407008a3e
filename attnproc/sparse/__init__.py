"""Sparse attention methods: :class:`SparseMethod` (the one path) and the built-in methods (each registers itself
on import)."""
from .base import SparseMethod  # noqa: F401
from . import agent, gna, radial  # noqa: F401,E402
from . import rectified, vmoba  # noqa: F401,E402
from . import sla  # noqa: F401,E402
