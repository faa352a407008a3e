"""diffusers' own fast pipeline tests, once stock (``Test<Family>Stock``) and once with ``attnproc.apply(pipe,
"dense")`` on every pipeline the tests build (``Test<Family>Dense``). Run by ../test_same_pass_set.py, which
asserts both variants pass the same tests; our own test here, ``test_attnproc_output_matches_stock``, compares the
outputs of one pipeline before and after ``apply``.
"""
import functools

import torch

import attnproc

from . import configs
from .common import BasePipelineTesterConfig, PipelineTesterMixin
from .family_tests import FluxFamilyTests, StableDiffusionFamilyTests
from .testing_utils import torch_device

# The PipelineTesterMixin tests we run: saving/loading, batching with CFG, step-end callbacks. The rest need an
# accelerator or variants on disk, or repeat these at more CI time (test_num_images_per_prompt alone runs 4 batches).
SELECTED = ("test_save_load_local", "test_inference_batch_single_identical", "test_callback_inputs")


def _old_style(fast_tests: type) -> type:
    """A new-style config from an old-style ``*FastTests`` class (its dummies take a device; its outputs are numpy)."""

    class Config(fast_tests, BasePipelineTesterConfig):
        required_input_params_in_call_signature = fast_tests.params
        batch_input_params = fast_tests.batch_params

        def get_dummy_inputs(self):
            inputs = fast_tests.get_dummy_inputs(self, torch_device)
            inputs["output_type"] = "pt"
            return inputs

    Config.__name__ = fast_tests.__name__.replace("FastTests", "Config")
    return Config


CONFIGS = {
    "SD15": (configs.StableDiffusionPipelineTesterConfig, StableDiffusionFamilyTests),
    "SDXL": (_old_style(configs.StableDiffusionXLPipelineFastTests), None),
    "SD3": (_old_style(configs.StableDiffusion3PipelineFastTests), None),
    "Flux": (configs.FluxPipelineTesterConfig, FluxFamilyTests),
    "FluxKontext": (_old_style(configs.FluxKontextPipelineFastTests), None),
    "Wan": (configs.WanPipelineTesterConfig, None),
    "HunyuanVideo": (_old_style(configs.HunyuanVideoPipelineFastTests), None),
    "CogVideoX": (configs.CogVideoXPipelineTesterConfig, None),
    "LTX": (_old_style(configs.LTXPipelineFastTests), None),
    "QwenImage": (configs.QwenImagePipelineTesterConfig, None),
}


@functools.lru_cache(maxsize=None)
def dense_pipeline_class(cls: type) -> type:
    """``cls`` with ``attnproc.apply(self, "dense")`` at the end of ``__init__``: every pipeline a test builds (directly,
    through ``get_pipeline`` or ``from_pretrained``) runs attnproc. Same name and signature, so diffusers' config and
    loading code see the stock class."""

    @functools.wraps(cls.__init__)
    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        attnproc.apply(self, "dense")

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


class _Selected(PipelineTesterMixin):
    """Only the SELECTED mixin tests are collected."""


for _name in dir(PipelineTesterMixin):
    if _name.startswith("test_") and _name not in SELECTED:
        setattr(_Selected, _name, None)


class _MatchesStock:
    def test_attnproc_output_matches_stock(self):
        components = self.get_dummy_components()
        pipe = self.pipeline_class.__mro__[1](**components)  # the stock class, same components
        pipe.set_progress_bar_config(disable=None)
        stock = self.run_pipe(pipe)
        attnproc.apply(pipe, "dense")
        dense = self.run_pipe(pipe)
        torch.testing.assert_close(dense, stock, rtol=1e-5, atol=1e-6)


for _family, (_config, _extra) in CONFIGS.items():
    _bases = (_config, _Selected) + ((_extra,) if _extra else ())
    globals()[f"Test{_family}Stock"] = type(f"Test{_family}Stock", _bases, {})
    globals()[f"Test{_family}Dense"] = type(f"Test{_family}Dense", (_MatchesStock,) + _bases,
                                            {"pipeline_class": dense_pipeline_class(_config.pipeline_class)})
