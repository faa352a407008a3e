"""Attention-steering edits (compose with a sparse method: ``apply(pipe, ["radial", "maskmod"], ...)``)."""
from . import maskmod  # noqa: F401  (registers the method)
from . import isolate  # noqa: F401  (registers the method)
from . import structured  # noqa: F401  (registers the method)
from . import keylock  # noqa: F401  (registers the method)
from .maskmod import MaskMod, modulate_scores

__all__ = ["MaskMod", "modulate_scores"]
