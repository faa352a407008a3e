"""Pipeline-level glue: tiny offline pipelines for tests, the demo and benchmarks."""
from .shapes_models import shapes_call_kwargs, shapes_pipeline
from .tiny import FAMILIES, NAMES, TINY_PIPELINES, TinyPipeline, tiny_call_kwargs, tiny_pipeline, tiny_record

__all__ = ["NAMES", "TINY_PIPELINES", "TinyPipeline", "tiny_pipeline", "tiny_call_kwargs", "tiny_record", "FAMILIES",
           "shapes_pipeline", "shapes_call_kwargs"]
