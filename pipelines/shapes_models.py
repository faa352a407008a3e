"""The trained shapes pipelines shipped in the package, loaded through the real diffusers path.

    pipe = shapes_pipeline("wan21")
    video = pipe(**shapes_call_kwargs("wan21", "a red circle moving right", generator=g)).frames

Each kind is a standard diffusers folder (``model_index.json``, safetensors in fp16) under
``pipelines/shapes_models/<kind>``, trained by :mod:`.shapes_train` on the shapes world
(:mod:`.shapes`). Measured quality: ``docs/shapes.md``.

=======  ==============================  =========================  ================================
kind     architecture                    output                     attention
=======  ==============================  =========================  ================================
sd15     UNet2DConditionModel + CLIP     64² image (latent 16²)     self + cross at 8², mid 4²
flux     FluxTransformer2DModel          64² image (8×8 tokens)     joint [text, image]
wan21    WanTransformer3DModel + UMT5    17 × 32² video (9×4×4)     video self-attention + cross
=======  ==============================  =========================  ================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .shapes_train import MODELS_DIR, SPECS, check_kind

KINDS: tuple[str, ...] = tuple(SPECS)

# What each model was trained for and samples best with (guidance tuned on other seeds).
_CALL = {
    "sd15": {"num_inference_steps": 25, "guidance_scale": 2.0},
    "flux": {"num_inference_steps": 20, "true_cfg_scale": 4.0, "negative_prompt": "", "max_sequence_length": 16},
    "wan21": {"num_inference_steps": 20, "guidance_scale": 3.0, "negative_prompt": "", "max_sequence_length": 16},
}


def shapes_model_dir(kind: str) -> Path:
    """The packaged folder of ``kind`` (raises if it was not shipped or not trained yet)."""
    folder = MODELS_DIR / check_kind(kind)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"no trained shapes model at {folder}; train it with "
            f"`python -m attnproc.pipelines.shapes train {kind}`"
        )
    return folder


def shapes_pipeline(kind: str, folder: str | Path | None = None):
    """The trained shapes pipeline of ``kind`` ("sd15", "wan21" or "flux"), fp32 on CPU.

    ``folder``: load a retrained copy (a ``shapes train --out``) instead of the packaged one."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder or shapes_model_dir(kind), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_call_kwargs(kind: str, prompt: str, **overrides) -> dict:
    """Call arguments ``kind`` was trained for: resolution, frames, steps, guidance; numpy output.

    ``pipe(**shapes_call_kwargs(kind, prompt, generator=g))`` gives ``.images`` [B, H, W, 3] for
    image models and ``.frames`` [B, F, H, W, 3] for video, floats in [0, 1].
    """
    spec = SPECS[check_kind(kind)]
    if not isinstance(prompt, (str, list)):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    kwargs = {"prompt": prompt, "height": spec.size, "width": spec.size, "output_type": "np", **_CALL[kind]}
    if spec.frames > 1:
        kwargs["num_frames"] = spec.frames
    kwargs.update(overrides)
    return kwargs


def eval_prompts(kind: str, n: int, start: int = 2_000_000_000) -> list[str]:
    """``n`` captions of the kind's own world from seeds far from the training ones (held out)."""
    from .shapes import render_sample

    spec = SPECS[check_kind(kind)]
    return [render_sample(start + i, spec.size, spec.frames, spec.max_shapes).caption for i in range(n)]


def generate(pipe, kind: str, prompts: list[str], seeds: list[int], batch: int = 16, **overrides) -> list:
    """One sample per (prompt, seed) pair, as uint8-able numpy arrays (images HWC, videos FHWC)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must pair up, got {len(prompts)} prompts and {len(seeds)} seeds")
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(**shapes_call_kwargs(kind, list(prompts[i:i + batch]), generator=gens, **overrides))
        out.extend(list(res.frames if hasattr(res, "frames") else res.images))
    return out


def quality(prompts: list[str], samples: list) -> dict:
    """Detector rates over samples (fractions): colour, kind, count, and motion for videos."""
    from .shapes_detect import verdict

    verdicts = [verdict(p, list(s) if np.asarray(s).ndim == 4 else s) for p, s in zip(prompts, samples)]
    keys = ["colour", "kind", "count"] + (["motion"] if verdicts and verdicts[0]["motion"] is not None else [])
    rates = {k: float(np.mean([v[k] for v in verdicts])) for k in keys}
    return {"n": len(verdicts), **rates, "verdicts": verdicts}
