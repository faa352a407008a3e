"""The shipped trained shapes pipelines: real loading path, size budget, package data, quality floor."""

import fnmatch
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from attnproc.pipelines import shapes_call_kwargs, shapes_pipeline
from attnproc.pipelines.shapes_models import KINDS, eval_prompts, generate, quality
from attnproc.pipelines.shapes_train import MODELS_DIR

ROOT = Path(__file__).resolve().parents[2]
ARCH = {"sd15": ("StableDiffusionPipeline", "unet", "UNet2DConditionModel"),
        "flux": ("FluxPipeline", "transformer", "FluxTransformer2DModel"),
        "wan21": ("WanPipeline", "transformer", "WanTransformer3DModel")}

# Floors on a small deterministic subset (8 held-out prompts × seeds): a regression in a pipeline,
# processor or writer drops below them. Measured full-set figures: docs/shapes.md.
# (measured on it: sd15 8/8, 8/8, 7/8; flux 8/8 each; wan21 colour 7/8, motion 6/8)
FLOORS = {"sd15": {"colour": 0.875, "kind": 0.875, "count": 0.75}, "flux": {"colour": 0.875, "kind": 0.875, "count": 0.875},
          "wan21": {"colour": 0.875, "motion": 0.75}}


def test_weights_fit_the_budget_and_are_fp16_safetensors():
    files = [p for p in MODELS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    from safetensors.torch import load_file

    for p in weights:
        dtypes = {t.dtype for t in load_file(str(p)).values()}
        assert dtypes <= {torch.float16, torch.int64}, (p, dtypes)


def test_model_files_are_package_data():
    """A non-editable install ships every model file: each matches a package-data glob of attnproc.pipelines."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["attnproc.pipelines"]
    pkg = MODELS_DIR.parent
    for p in MODELS_DIR.rglob("*"):
        if p.is_file():
            rel = p.relative_to(pkg).as_posix()
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


@pytest.mark.parametrize("kind", KINDS)
def test_loads_through_diffusion_pipeline(kind):
    pipe = shapes_pipeline(kind)
    cls, attr, model = ARCH[kind]
    assert type(pipe).__name__ == cls and type(getattr(pipe, attr)).__name__ == model
    assert all(p.dtype == torch.float32 for p in getattr(pipe, attr).parameters())


def test_call_kwargs_and_bad_kind():
    kw = shapes_call_kwargs("wan21", "a red circle moving right", num_inference_steps=3)
    assert kw["num_frames"] >= 17 and kw["num_inference_steps"] == 3 and kw["prompt"] == "a red circle moving right"
    assert "num_frames" not in shapes_call_kwargs("sd15", "a red circle")
    with pytest.raises(ValueError, match="kind must be one of"):
        shapes_call_kwargs("sdxl", "a red circle")
    with pytest.raises(ValueError, match="kind must be one of"):
        shapes_pipeline("nosuch")


@pytest.mark.parametrize("kind", KINDS)
def test_quality_floor_on_fixed_subset(kind):
    torch.set_num_threads(1)
    prompts = eval_prompts(kind, 8)
    samples = generate(shapes_pipeline(kind), kind, prompts, list(range(8)), batch=8)
    shape = np.asarray(samples[0]).shape
    assert shape[-1] == 3 and (len(shape) == 4) == (kind == "wan21")
    q = quality(prompts, samples)
    for key, floor in FLOORS[kind].items():
        assert q[key] >= floor, (kind, {k: v for k, v in q.items() if k != "verdicts"})


def test_demo_renders_trained_video_with_report(tmp_path):
    from attnproc.workflows.demo import run_demo

    report = run_demo("radial", tmp_path, {"dense_first_steps": 0}, progress=False, repeats=1, warmup=0)
    assert report["prompt"] == "a red circle moving right" and report["runs"]["radial"]["shape"][0] >= 17
    assert set(report["verdict"]) == {"dense", "radial"}
    assert (tmp_path / "contact-sheet.png").stat().st_size > 0
    assert Path(report["side_by_side"]).exists()
    fid = report["fidelity_vs_dense"]["radial"]
    assert 0 < fid["ssim"] <= 1 and fid["psnr_db"] > 0
