"""``attnproc demo``: render the trained shapes video model (or a tiny random-weight pipeline) with dense
attention and with a chosen method; for shapes models also a side-by-side video, a contact sheet and the
detector's verdict on each run."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import attnproc
from attnproc.pipelines import shapes_call_kwargs, shapes_pipeline, tiny_call_kwargs, tiny_pipeline

from .maskviz import mask_image, method_mask
from .media import atomic_path, save_video, to_uint8_frames


def _render(pipe, call_kwargs):
    out = pipe(**call_kwargs)
    frames = out.frames[0] if hasattr(out, "frames") else out.images
    return torch.as_tensor(np.asarray(frames))


DEMO_FAMILY = "shapes:wan21"
DEMO_PROMPT = "a red circle moving right"


def _pipeline_and_call(family: str, seed: int, prompt: str | None, overrides: dict):
    """``shapes:KIND`` → the trained shapes model and its call; else a tiny random-weight family."""
    if family.startswith("shapes:"):
        kind = family.split(":", 1)[1]
        return shapes_pipeline(kind), shapes_call_kwargs(kind, prompt or DEMO_PROMPT, **overrides)
    call = tiny_call_kwargs(family, output_type="np", **overrides)
    if prompt:
        call["prompt"] = prompt
    return tiny_pipeline(family, seed=seed), call


def run_demo(method: str = "dense", out_dir: str | Path = "attnproc-demo", options: dict | None = None,
             family: str = DEMO_FAMILY, seed: int = 0, call_overrides: dict | None = None,
             progress: bool = True, prompt: str | None = None) -> dict:
    """Render with ``dense`` and with ``method``; write the videos and ``report.json``; return the report."""
    options = options or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attnproc.registry.REGISTRY.create(method, **options)  # validate before any work
    pipe, call = _pipeline_and_call(family, seed, prompt, call_overrides or {})
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    runs = ["dense"] if method == "dense" else ["dense", method]
    results, report = {}, {"family": family, "pipeline": type(pipe).__name__, "method": method,
                           "options": options, "seed": seed, "runs": {}}
    for name in tqdm(runs, desc="attnproc demo", disable=not progress):
        handle = attnproc.apply(pipe, name, **(options if name == method else {}))
        call["generator"] = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        frames = _render(pipe, call)
        seconds = time.perf_counter() - start
        layouts = {k: (asdict(v) if v is not None else None) for k, v in handle.last_layouts().items()}
        if name == method:
            report["mask_picture"] = _save_mask(handle, out_dir / f"{name}-mask.png")
        attnproc.remove(pipe)
        results[name] = frames
        path = save_video(frames, out_dir / f"{name}.mp4")
        report["runs"][name] = {"seconds": round(seconds, 4), "output": str(path), "patched": handle.num_patched,
                                "layout_seen": layouts, "shape": list(frames.shape)}
    if method != "dense":
        diff = (results[method].float() - results["dense"].float()).abs()
        report["max_abs_diff_to_dense"] = float(diff.max())
        report["speedup_vs_dense"] = round(report["runs"]["dense"]["seconds"] /
                                           max(report["runs"][method]["seconds"], 1e-9), 3)
    else:
        report["max_abs_diff_to_dense"] = 0.0
    frames_u8 = to_uint8_frames(results[method])
    report["frames"] = int(frames_u8.shape[0])
    if family.startswith("shapes:"):
        report["prompt"] = call["prompt"]
        report.update(shapes_report({k: to_uint8_frames(v) for k, v in results.items()}, call["prompt"], out_dir))
    _write_json(out_dir / "report.json", report)
    return report


def shapes_report(runs: dict[str, np.ndarray], prompt: str, out_dir: Path) -> dict:
    """Side-by-side video, contact sheet, the detector's verdict per run and fidelity vs dense."""
    from attnproc.pipelines.shapes_detect import verdict

    from .fidelity import psnr, ssim
    from .sheets import contact_sheet, side_by_side

    out = {"side_by_side": str(save_video(side_by_side(runs), out_dir / "side-by-side.mp4"))}
    with atomic_path(out_dir / "contact-sheet.png", ".tmp.png") as tmp:
        contact_sheet(runs).save(tmp, format="PNG")
    out["contact_sheet"] = str(out_dir / "contact-sheet.png")
    out["verdict"] = {name: verdict(prompt, list(frames)) for name, frames in runs.items()}
    out["fidelity_vs_dense"] = {name: {"psnr_db": psnr(frames, runs["dense"]), "ssim": ssim(frames, runs["dense"])}
                                for name, frames in runs.items() if name != "dense"}
    return out


def _save_mask(handle, path: Path) -> str | None:
    """Draw the method's sparsity pattern at the layout the first denoiser saw; None for dense methods."""
    denoiser, patch = next(iter(handle.denoisers.items()))
    layout = handle.last_layouts()[denoiser]
    if layout is None:
        return None
    mask = method_mask(handle.method, patch.family, layout)
    if mask is None:
        return None
    with atomic_path(path, ".tmp.png") as tmp:
        mask_image(mask).save(tmp, format="PNG")
    return str(path)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path, ".tmp.json") as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
