"""``attnproc demo``: render one pipeline with dense attention and with a chosen method, side by side.

The default pipeline is the trained shapes video model (``shapes:wan21``), so the output shows the prompted shape
move and the detector can say whether the method kept it. The method is checked against the pipeline before
anything renders (:mod:`.preflight`); both runs are timed by the shared helper (:mod:`.timing`: warm-up,
alternating rounds, median and spread, total and attention time); the difference is in 0-255 pixel levels, as in
``render --compare`` and the UI.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .jobs import Job
from .maskviz import handle_mask, legend_image
from .media import atomic_path, save_video
from .preflight import check_method, create_method, pipeline_facts, with_call_prompt
from .render import _save, build_call, compare_frames, load_pipeline, run_once
from .timing import compare_runs, measure_runs

DEFAULT_PIPELINE = "shapes:wan21"  # what `attnproc demo` renders unless given --pipeline/--family
DEFAULT_PROMPT = "a red circle moving right"


def run_demo(method: str = "dense", out_dir: str | Path = "attnproc-demo", options: dict | None = None,
             pipeline: str = DEFAULT_PIPELINE, seed: int = 0, prompt: str = DEFAULT_PROMPT,
             call_overrides: dict | None = None, repeats: int = 3, warmup: int = 1, progress: bool = True) -> dict:
    """Render ``pipeline`` with ``dense`` and with ``method``; write the outputs, the mask picture and
    ``report.json`` (for shapes models also a side-by-side video, a contact sheet, the detector's verdict and
    PSNR/SSIM vs dense); return the report."""
    options = with_call_prompt(method, dict(options or {}), prompt)
    create_method(method, options)  # option errors before any pipeline is built
    facts = pipeline_facts(pipeline)
    check_method(facts, method, options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = facts.target if pipeline.startswith("tiny:") else load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    job = Job(index=0, name=None, prompt=prompt, negative_prompt=None, seed=seed, steps=None, height=None,
              width=None, frames=None, guidance_scale=None, method=method, options=options,
              call=dict(call_overrides or {}))

    def render(name: str, opts: dict):
        return lambda: run_once(pipe, name, opts, build_call(pipe, pipeline, job))

    report = {"pipeline": pipeline, "pipeline_class": facts.pipeline_class, "families": facts.families,
              "method": method, "options": options, "seed": seed, "prompt": prompt, "runs": {}}
    if method == "dense":
        run, timings = measure_runs(render("dense", {}), repeats=repeats, warmup=warmup)
        results, report["timing"] = {"dense": run}, {"dense": timings}
    else:
        run, ref, report["timing"] = compare_runs(render(method, options), render("dense", {}), repeats=repeats,
                                                  warmup=warmup, names=(method, "dense"))
        results = {"dense": ref, method: run}
        report["difference_to_dense"] = compare_frames(run["frames"], ref["frames"])
    for name, res in results.items():
        path = _save(res["frames"], res["kind"], out_dir / name, fps=8)
        handle = res["handle"]
        report["runs"][name] = {
            "output": str(path), "kind": res["kind"], "shape": list(res["frames"].shape),
            "patched": handle.num_patched, "method_options": res["method_options"],
            "layout_seen": {k: (asdict(v) if v is not None else None) for k, v in handle.last_layouts().items()},
        }
    report["mask_picture"] = _save_mask(results[method]["handle"], out_dir / f"{method}-mask.png")
    if pipeline.startswith("shapes:"):
        report.update(shapes_report({k: np.asarray(v["frames"]) for k, v in results.items()}, prompt, out_dir))
    _write_json(out_dir / "report.json", report)
    return report


def shapes_report(runs: dict[str, np.ndarray], prompt: str, out_dir: Path) -> dict:
    """Side-by-side video, contact sheet, the detector's verdict per run and fidelity vs dense (uint8 frames)."""
    from attnproc.pipelines.shapes_detect import verdict

    from .fidelity import psnr, ssim
    from .sheets import contact_sheet, side_by_side

    out = {"side_by_side": str(save_video(side_by_side(runs), out_dir / "side-by-side.mp4"))}
    with atomic_path(out_dir / "contact-sheet.png", ".tmp.png") as tmp:
        contact_sheet(runs).save(tmp, format="PNG")
    out["contact_sheet"] = str(out_dir / "contact-sheet.png")
    out["verdict"] = {name: verdict(prompt, list(frames)) for name, frames in runs.items()}
    out["fidelity_vs_dense"] = {}
    for name, frames in runs.items():
        if name != "dense":
            db = psnr(frames, runs["dense"])
            out["fidelity_vs_dense"][name] = {"psnr_db": None if db == float("inf") else db,  # None: identical
                                              "ssim": ssim(frames, runs["dense"])}
    return out


def _save_mask(handle, path: Path) -> str | None:
    """The method's sparsity pattern at the layout the first denoiser saw, with a legend; None for methods
    that keep every pair."""
    found = handle_mask(handle)
    if found is None or found[0] is None:
        return None
    mask, caption = found
    with atomic_path(path, ".tmp.png") as tmp:
        legend_image(mask, caption).save(tmp, format="PNG")
    return str(path)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path, ".tmp.json") as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str, allow_nan=False)
