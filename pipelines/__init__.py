"""Pipeline-level glue: tiny offline pipelines for tests, the demo and benchmarks."""
from .shapes_models import shapes_call_kwargs, shapes_pipeline
from .tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline

__all__ = ["FAMILIES", "tiny_pipeline", "tiny_call_kwargs", "shapes_pipeline", "shapes_call_kwargs"]
