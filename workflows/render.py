"""``attnproc render JOBFILE``: batch rendering from a job file, with a resumable JSON-lines manifest.

Each process appends one record per finished job to ``manifest.parts/rank<R>.jsonl`` (a line is written whole
and fsynced; a torn last line from a kill is ignored). A job counts as finished when a ``done`` record with the
same config hash exists and its output is on disk, so a re-run skips it; a job interrupted mid-render has no
record and is redone (outputs are written atomically, so no half-written file is ever taken for a result). At the
end the main process merges every record into ``manifest.jsonl`` (one line per job of the job file, in job order,
written atomically) and removes the parts.

Under ``accelerate launch`` the pending jobs are split with ``PartialState.split_between_processes``; every
process reads the manifest before any of them renders, so all agree on the split: no job is done twice or lost.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import attnproc

from .jobs import Job, JobFile, load_jobfile
from .media import atomic_path, save_image, save_video, to_uint8_frames

MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- pipelines
def load_pipeline(spec: str, options: dict | None = None, device: str | torch.device | None = None):
    """``tiny:<family>`` (offline, random weights), a local folder, or a hub id (``DiffusionPipeline``)."""
    options = options or {}
    if spec.startswith("tiny:"):
        from attnproc.pipelines import tiny_pipeline

        pipe = tiny_pipeline(spec[5:], seed=int(options.get("seed", 0)))
    else:
        from diffusers import DiffusionPipeline

        kwargs = {"torch_dtype": _DTYPES[options.get("dtype", "float32")]}
        if options.get("variant"):
            kwargs["variant"] = options["variant"]
        pipe = DiffusionPipeline.from_pretrained(spec, **kwargs)
    if spec.startswith("tiny:") and options.get("dtype", "float32") != "float32":
        pipe.to(dtype=_DTYPES[options["dtype"]])
    target = options.get("device") or device
    if target is not None and str(target) != "cpu":
        pipe.to(target)
    return pipe


def _call_parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def is_video_pipeline(pipe) -> bool:
    return "num_frames" in _call_parameters(pipe)


def build_call(pipe, spec: str, job: Job, device: torch.device | str = "cpu") -> dict:
    """The pipeline ``__call__`` kwargs for ``job`` (tiny pipelines start from ``tiny_call_kwargs``)."""
    params = _call_parameters(pipe)
    if spec.startswith("tiny:"):
        from attnproc.pipelines import tiny_call_kwargs

        call = tiny_call_kwargs(spec[5:], output_type="np")
    else:
        call = {"output_type": "np"}
    call["prompt"] = job.prompt
    fields = {"negative_prompt": job.negative_prompt, "num_inference_steps": job.steps, "height": job.height,
              "width": job.width, "num_frames": job.frames, "guidance_scale": job.guidance_scale}
    for key, value in fields.items():
        if value is None:
            continue
        if key not in params:
            field = {"num_inference_steps": "steps", "num_frames": "frames"}.get(key, key)
            raise ValueError(f"job {job.index} field {field!r}: {type(pipe).__name__} takes no {key!r} "
                             f"({'an image pipeline' if key == 'num_frames' else 'unsupported'}); remove it")
        call[key] = value
    call.update(job.call)
    gen_device = "cpu" if torch.device(device).type == "cpu" else device
    call["generator"] = torch.Generator(device=gen_device).manual_seed(job.seed)
    return call


def _frames_of(result) -> tuple[np.ndarray, str]:
    """uint8 frames [F, H, W, C] and "video" or "image"."""
    if hasattr(result, "frames") and result.frames is not None:
        return to_uint8_frames(np.asarray(result.frames[0])), "video"
    images = result.images
    first = images[0] if not hasattr(images, "save") else images
    return to_uint8_frames(np.asarray(first, dtype=np.float32) / (255.0 if hasattr(first, "save") else 1.0)), "image"


# ----------------------------------------------------------------------------- measuring
class AttentionTimer:
    """Times every ``method.attention`` call of an applied method (no per-method code): wraps the instance's
    bound ``attention``. On CUDA it synchronises after each call so the time is the kernel's, not the launch's."""

    def __init__(self, method: attnproc.Method):
        self.seconds, self.calls = 0.0, 0
        inner = method.attention

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.is_cuda:
                torch.cuda.synchronize(out.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        method.attention = timed


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """CUDA: ``torch.cuda.max_memory_allocated`` since the job started. CPU: the process's peak resident set
    (``getrusage`` maxrss), which only grows over a process's life."""
    if torch.device(device).type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"kind": "cpu_process_peak_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}


def run_once(pipe, method, options: dict, call: dict, device="cpu", step_callback: Callable | None = None) -> dict:
    """Apply ``method`` (a name or list), render ``call``, remove it; frames, kind and timings."""
    if isinstance(method, (list, tuple)):
        handle = attnproc.apply(pipe, list(method), **options)
    else:
        handle = attnproc.apply(pipe, method, **options)
    timer = AttentionTimer(handle.method)
    try:
        call = dict(call)
        if step_callback is not None and "callback_on_step_end" in _call_parameters(pipe):
            def _cb(p, i, t, kw):
                step_callback(i)
                return {}
            call["callback_on_step_end"] = _cb
        _reset_peak(device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = pipe(**call)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
    finally:
        attnproc.remove(pipe)
    frames, kind = _frames_of(result)
    return {"frames": frames, "kind": kind, "total_s": total, "attention_s": timer.seconds,
            "attention_calls": timer.calls, "peak_memory": peak_memory(device), "patched": handle.num_patched,
            "method_options": _options_of(handle.method), "handle": handle}


def _options_of(method) -> dict:
    if isinstance(method, attnproc.Composed):
        return {m.name: _options_of(m) for m in [method.base, *method.edits]}
    cfg = method.config
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str)) if dataclasses.is_dataclass(cfg) else {}


def _save(frames: np.ndarray, kind: str, stem: Path, fps: int) -> Path:
    if kind == "image":
        return save_image(frames[0], stem.with_suffix(".png"))
    return save_video(frames, stem.with_suffix(".mp4"), fps=fps)


def compare_frames(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64), b.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


# ----------------------------------------------------------------------------- manifest
def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn line from a killed run
            continue
        if isinstance(rec, dict) and "hash" in rec:
            records.append(rec)
    return records


def read_records(out_dir: Path) -> list[dict]:
    """Every record in ``manifest.jsonl`` and the per-process parts, oldest first."""
    out_dir = Path(out_dir)
    records = _read_jsonl(out_dir / MANIFEST)
    parts = out_dir / PARTS
    if parts.is_dir():
        for p in sorted(parts.glob("*.jsonl")):
            records += _read_jsonl(p)
    return records


def _finished(records: list[dict], out_dir: Path, compare: str | None) -> dict[str, dict]:
    done = {}
    for rec in records:
        if rec.get("status") != "done" or not (out_dir / rec.get("output", "\0")).exists():
            continue
        if compare and (rec.get("compare") or {}).get("method") != compare:
            continue
        done[rec["hash"]] = rec
    return done


def _append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, allow_nan=True) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a killed writer may have left a torn line: start on a fresh one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def merge_manifest(jobfile: JobFile, out_dir: Path, compare: str | None = None) -> list[dict]:
    """Write ``manifest.jsonl``: the newest valid record of each job, in job order; remove the parts."""
    out_dir = Path(out_dir)
    records = read_records(out_dir)
    latest: dict[str, dict] = {}
    for rec in records:
        prev = latest.get(rec["hash"])
        if prev is None or rec.get("status") == "done" or prev.get("status") != "done":
            latest[rec["hash"]] = rec
    done = _finished(records, out_dir, None)
    merged = []
    for job in jobfile.jobs:
        h = jobfile.hash_of(job)
        rec = done.get(h) or latest.get(h)
        if rec is not None:
            merged.append({**rec, "job": job.index, "name": job.name})
    with atomic_path(out_dir / MANIFEST, ".tmp.jsonl") as tmp, open(tmp, "w") as f:
        for rec in merged:
            f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    parts = out_dir / PARTS
    if parts.is_dir():
        for p in parts.glob("*.jsonl"):
            p.unlink()
        try:
            parts.rmdir()
        except OSError:
            pass
    return merged


# ----------------------------------------------------------------------------- the batch
def _label(method) -> str:
    return "+".join(method) if isinstance(method, tuple) else method


def render_job(pipe, jobfile: JobFile, job: Job, out_dir: Path, *, compare: str | None = None,
               device="cpu", step_callback: Callable | None = None) -> dict:
    """Render one job (and its comparison run); write its output(s); return its manifest record."""
    h = jobfile.hash_of(job)
    call = build_call(pipe, jobfile.pipeline, job, device)
    stem = out_dir / f"{job.name or _label(job.method)}-s{job.seed}-{h}"
    run = run_once(pipe, job.method, job.options, call, device, step_callback)
    path = _save(run["frames"], run["kind"], stem, jobfile.fps)
    record = {
        "job": job.index, "name": job.name, "hash": h, "status": "done",
        "config": jobfile.config_of(job),
        "call": {k: v for k, v in call.items() if k != "generator" and not callable(v)},
        "method": _label(job.method), "method_options": run["method_options"], "seed": job.seed,
        "output": str(path.relative_to(out_dir)), "kind": run["kind"], "shape": list(run["frames"].shape),
        "timings": {"total_s": round(run["total_s"], 6), "attention_s": round(run["attention_s"], 6),
                    "attention_calls": run["attention_calls"]},
        "peak_memory": run["peak_memory"], "patched_modules": run["patched"], "device": str(device),
    }
    if compare:
        if _label(job.method) == compare and not job.options:
            ref, ref_path = run, path
        else:
            call = build_call(pipe, jobfile.pipeline, job, device)
            ref = run_once(pipe, compare, {}, call, device, step_callback)
            ref_path = _save(ref["frames"], ref["kind"], stem.with_name(stem.name + f"-{compare}"), jobfile.fps)
        record["compare"] = {
            "method": compare, "output": str(ref_path.relative_to(out_dir)),
            "timings": {"total_s": round(ref["total_s"], 6), "attention_s": round(ref["attention_s"], 6)},
            "speedup": round(ref["total_s"] / max(run["total_s"], 1e-9), 4),
            "attention_speedup": round(ref["attention_s"] / max(run["attention_s"], 1e-9), 4),
            **compare_frames(run["frames"], ref["frames"]),
        }
    return record


def render(jobfile: JobFile | str | Path, out_dir: str | Path | None = None, *, compare: str | None = None,
           progress: bool = True, state=None) -> dict:
    """Render every unfinished job of ``jobfile`` into ``out_dir``; return a summary.

    ``state`` is an ``accelerate.PartialState``; by default one is made (CPU unless CUDA is present and the job
    file does not ask for ``device: cpu``), which is a single process unless launched by ``accelerate launch``.
    """
    if not isinstance(jobfile, JobFile):
        jobfile = load_jobfile(jobfile)
    if compare:
        attnproc.registry.REGISTRY.get(compare)  # an unknown name fails before any work
    if out_dir is None:
        out_dir = jobfile.output or (Path(jobfile.source).with_suffix("").name + "-render"
                                     if jobfile.source else "attnproc-render")
    out_dir = Path(out_dir)
    if state is None:
        from accelerate import PartialState

        want_cpu = jobfile.pipeline_options.get("device") == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=want_cpu)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    done = _finished(read_records(out_dir), out_dir, compare)
    pending, seen = [], set(done)
    for j in jobfile.jobs:  # jobs with identical configs render once
        h = jobfile.hash_of(j)
        if h not in seen:
            seen.add(h)
            pending.append(j)
    state.wait_for_everyone()  # every process has read the same manifest before anyone writes to it
    device = jobfile.pipeline_options.get("device") or state.device
    part = out_dir / PARTS / f"rank{rank}-of-{world}.jsonl"
    failed = 0
    with state.split_between_processes(pending) as mine:
        if mine:
            pipe = load_pipeline(jobfile.pipeline, jobfile.pipeline_options, device)
            steps_bar = tqdm(desc=f"steps (rank {rank})" if world > 1 else "steps", unit="step",
                             disable=not progress, leave=False, position=1)
            jobs_bar = tqdm(mine, desc=f"jobs (rank {rank})" if world > 1 else "jobs", unit="job",
                            disable=not progress, position=0)
            for job in jobs_bar:
                steps_bar.reset(total=(job.steps or 0) * (2 if compare else 1) or None)
                try:
                    record = render_job(pipe, jobfile, job, out_dir, compare=compare, device=device,
                                        step_callback=lambda i: steps_bar.update(1))
                except Exception as e:  # recorded and reported; the other jobs go on
                    failed += 1
                    record = {"job": job.index, "name": job.name, "hash": jobfile.hash_of(job), "status": "error",
                              "config": jobfile.config_of(job), "error": f"{type(e).__name__}: {e}"}
                    tqdm.write(f"attnproc render: job {job.index} failed: {record['error']}", file=sys.stderr)
                record.update(rank=rank, world_size=world, finished_at=time.time())
                _append_record(part, record)
            steps_bar.close()
            jobs_bar.close()
    state.wait_for_everyone()
    summary = {"out_dir": str(out_dir), "jobs": len(jobfile.jobs), "skipped": len(done),
               "rendered_here": 0, "failed": 0, "manifest": str(out_dir / MANIFEST)}
    if state.is_main_process:
        merged = merge_manifest(jobfile, out_dir, compare)
        summary["failed"] = sum(r.get("status") != "done" for r in merged)
        summary["done"] = sum(r.get("status") == "done" for r in merged)
    summary["rendered_here"] = len(mine) - failed if pending else 0
    state.wait_for_everyone()
    return summary
