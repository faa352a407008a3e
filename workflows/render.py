"""``attnproc render JOBFILE``: batch rendering from a job file, with a resumable, append-only manifest.

Every finished job adds a record to the folder's manifest (see :mod:`.manifest`), which every job file rendered
into the folder shares. A job counts as finished when a ``done`` record with the same config hash exists and its
output is on disk, so a re-run (of this or any other job file with the same job) skips it; a job interrupted
mid-render has no record and is redone (outputs are written atomically, and the temporary file a killed writer
left is removed at the next start).

Under ``accelerate launch`` the pending jobs are split with ``PartialState.split_between_processes``; every
process reads the manifest before any of them renders, so all agree on the split: no job is done twice or lost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import resource
import uuid
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import attnproc

from .cp import enable_context_parallel, parse_cp
from .jobs import Job, JobFile, check_jobfile, load_jobfile
from .manifest import MANIFEST, PARTS, append_record, current, finished, fold_parts, read_records
from .media import remove_stale_temp_files, save_image, save_video, to_uint8_frames
from .preflight import check_method
from .timing import check_counts, compare_runs, stats
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- pipelines
def load_pipeline(spec: str, options: dict | None = None, device: str | torch.device | None = None):
    """``tiny:<family>`` (offline, random weights), ``shapes:<kind>`` (the trained shapes models shipped in the
    package, loaded from their folder like any local one), a local folder, or a hub id (``DiffusionPipeline``)."""
    options = options or {}
    if spec.startswith("shapes:"):
        from attnproc.pipelines.shapes_models import shapes_model_dir

        spec = str(shapes_model_dir(spec[7:]))
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
    """The pipeline ``__call__`` kwargs for ``job`` (tiny and shapes pipelines start from their call kwargs)."""
    params = _call_parameters(pipe)
    if spec.startswith("tiny:"):
        from attnproc.pipelines import tiny_call_kwargs

        call = tiny_call_kwargs(spec[5:], output_type="np")
    elif spec.startswith("shapes:"):
        from attnproc.pipelines import shapes_call_kwargs

        call = shapes_call_kwargs(spec[7:], job.prompt)  # what the model was trained for
    else:
        call = {"output_type": "np"}
    call["prompt"] = job.prompt
    batch = batch_prompts(job)
    if batch is not None:
        call["prompt"] = batch
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


def batch_prompts(job: Job) -> list[str] | None:
    """A method option named ``prompts`` (isolate: the reference prompts, then the scene) is the batch the pipeline
    renders; its last prompt must be the job's prompt (the image that is kept). ``None`` when no method has one."""
    methods = list(job.method) if isinstance(job.method, (list, tuple)) else [job.method]
    options = job.options or {}
    for m in methods:
        mine = options.get(m) if len(methods) > 1 else options
        prompts = mine.get("prompts") if isinstance(mine, dict) else None
        if isinstance(prompts, (list, tuple)) and prompts:
            if prompts[-1] != job.prompt:
                raise ValueError(f"job {job.index}: the last of method {m!r}'s prompts ({prompts[-1]!r}) must be the "
                                 f"job's prompt {job.prompt!r} (the scene that is rendered and kept)")
            return list(prompts)
    return None


def _frames_of(result, index: int = 0) -> tuple[np.ndarray, str]:
    """uint8 frames [F, H, W, C] and "video" or "image", of output ``index`` of the batch."""
    if hasattr(result, "frames") and result.frames is not None:
        return to_uint8_frames(np.asarray(result.frames[index])), "video"
    images = result.images
    first = images[index] if not hasattr(images, "save") else images
    return to_uint8_frames(np.asarray(first, dtype=np.float32) / (255.0 if hasattr(first, "save") else 1.0)), "image"


# ----------------------------------------------------------------------------- measuring
class AttentionTimer:
    """Times every ``method.attention`` call of an applied method (no per-method code): wraps the instance's
    bound ``attention``. On CUDA it synchronises after each call so the time is the kernel's, not the launch's.
    ``by_kind`` splits the seconds by the calls' site kind (self, cross, joint)."""

    def __init__(self, method: attnproc.Method):
        self.seconds, self.calls = 0.0, 0
        self.by_kind: dict[str, float] = {}
        inner = method.attention

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.is_cuda:
                torch.cuda.synchronize(out.device)
            dt = time.perf_counter() - start
            self.seconds += dt
            self.calls += 1
            kind = getattr(args[3] if len(args) > 3 else kwargs.get("site"), "kind", None)
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + dt
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
    # a list of prompts in `call` (isolate: the references, then the scene) renders the batch; its last image is kept
    frames, kind = _frames_of(result, -1 if isinstance(call.get("prompt"), (list, tuple)) else 0)
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
    """Differences between two uint8 renders, in 0-255 pixel levels; ``psnr_db`` is None (JSON null) when they
    are identical (an infinite PSNR is not valid JSON)."""
    a, b = to_uint8_frames(a).astype(np.float64), to_uint8_frames(b).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
            "psnr_db": None if mse == 0 else round(float(10 * np.log10(255.0 ** 2 / mse)), 3),
            "diff_units": "uint8 pixel levels (0-255)"}


# ----------------------------------------------------------------------------- the batch
def _label(method) -> str:
    return "+".join(method) if isinstance(method, tuple) else method


def render_job(pipe, jobfile: JobFile, job: Job, out_dir: Path, *, compare: str | None = None,
               device="cpu", step_callback: Callable | None = None, repeats: int = 3, write: bool = True) -> dict:
    """Render one job (and, with ``compare``, time it against that method: warmed up, alternating, ``repeats``
    rounds, see :mod:`.timing`); write its output(s); return its manifest record (``write=False``: a context-
    parallel rank other than the main one, which renders its shard and writes nothing: ``None``)."""
    h = jobfile.hash_of(job)
    stem = out_dir / f"{job.name or _label(job.method)}-s{job.seed}-{h}"

    def run_job():
        return run_once(pipe, job.method, job.options, build_call(pipe, jobfile.pipeline, job, device), device,
                        step_callback)

    if compare:
        run, ref, report = compare_runs(
            run_job, lambda: run_once(pipe, compare, {}, build_call(pipe, jobfile.pipeline, job, device), device,
                                      step_callback),
            repeats=repeats, names=(_label(job.method), compare))
        timings = report[_label(job.method)]
    else:
        run = run_job()
        timings = single_run_timings(run)
    if not write:
        return None
    path = _save(run["frames"], run["kind"], stem, jobfile.fps)
    record = {
        "job": job.index, "name": job.name, "hash": h, "status": "done",
        "config": jobfile.config_of(job),
        "call": {k: v for k, v in build_call(pipe, jobfile.pipeline, job, device).items()
                 if k != "generator" and not callable(v)},
        "method": _label(job.method), "method_options": run["method_options"], "seed": job.seed,
        "output": str(path.relative_to(out_dir)), "kind": run["kind"], "shape": list(run["frames"].shape),
        "timings": timings, "peak_memory": run["peak_memory"], "patched_modules": run["patched"],
        "device": str(device),
    }
    if compare:
        ref_path = _save(ref["frames"], ref["kind"], stem.with_name(stem.name + f"-{compare}"), jobfile.fps)
        record["compare"] = {"method": compare, "output": str(ref_path.relative_to(out_dir)),
                             "timings": report[compare], "speedup": report["speedup"],
                             "within_noise": report["within_noise"], "verdict": report["verdict"],
                             **compare_frames(run["frames"], ref["frames"])}
    return record


def single_run_timings(run: dict) -> dict:
    """The timings of one render in the same form as :func:`.timing.measure_runs` gives (one run, no warm-up:
    the first render of a process includes its start-up costs)."""
    return {**{k: stats([run[k]]) for k in ("total_s", "attention_s")}, "repeats": 1, "warmup": 0,
            "attention_calls": run["attention_calls"]}


def render(jobfile: JobFile | str | Path, out_dir: str | Path | None = None, *, compare: str | None = None,
           repeats: int = 3, progress: bool = True, state=None, cp: str | None = None,
           cp_setup: Callable | None = None) -> dict:
    """Render every unfinished job of ``jobfile`` into ``out_dir``; return a summary.

    With ``compare``, each job is timed against that method over ``repeats`` warm, alternating rounds.
    ``state`` is an ``accelerate.PartialState``; by default one is made (CPU unless CUDA is present and the job
    file does not ask for ``device: cpu``), which is a single process unless launched by ``accelerate launch``.
    ``cp`` (``"ulysses=N"`` / ``"ring=N"``, :mod:`.cp`): every process renders every job together under
    diffusers' context parallelism (``cp_setup(model, config)`` enables it; default ``enable_parallelism``)
    and the main process writes; without it the jobs are split between the processes.
    """
    if not isinstance(jobfile, JobFile):
        jobfile = load_jobfile(jobfile)
    check_counts(repeats, 1)
    cp_spec = parse_cp(cp)
    if compare:
        attnproc.create(compare)  # an unknown name fails before any work
    facts = check_jobfile(jobfile)  # every job against the pipeline's family and call, before anything renders
    if compare:
        check_method(facts, compare, {})
    if out_dir is None:
        out_dir = jobfile.output or (Path(jobfile.source).with_suffix("").name + "-render"
                                     if jobfile.source else "attnproc-render")
    out_dir = Path(out_dir)
    if state is None:
        from accelerate import PartialState

        want_cpu = jobfile.pipeline_options.get("device") == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=want_cpu)
    rank, world = state.process_index, state.num_processes
    if cp_spec is not None:
        cp_spec.check_world(world)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir)  # what a render killed mid-write left
        fold_parts(out_dir)  # records of a killed run join the manifest
    state.wait_for_everyone()

    hashes = [jobfile.hash_of(j) for j in jobfile.jobs]
    done = finished(read_records(out_dir), out_dir, compare)
    pending, seen = [], set(done)
    for j, h in zip(jobfile.jobs, hashes):  # jobs with identical configs render once
        if h not in seen:
            seen.add(h)
            pending.append(j)
    state.wait_for_everyone()  # every process has read the same manifest before anyone writes to it
    device = jobfile.pipeline_options.get("device") or state.device
    part = out_dir / PARTS / f"{os.getpid()}-rank{rank}-of-{world}.jsonl"
    failed = 0
    with _shares(state, pending, cp_spec) as mine:
        if mine:
            pipe = load_pipeline(jobfile.pipeline, jobfile.pipeline_options, device)
            if cp_spec is not None:
                enable_context_parallel(pipe, cp_spec, cp_setup)
            steps_bar = tqdm(desc=f"steps (rank {rank})" if world > 1 else "steps", unit="step",
                             disable=not progress, leave=False, position=1)
            jobs_bar = tqdm(mine, desc=f"jobs (rank {rank})" if world > 1 else "jobs", unit="job",
                            disable=not progress, position=0)
            for job in jobs_bar:
                steps_bar.reset(total=(job.steps or 0) * (2 * (repeats + 1) if compare else 1) or None)
                try:
                    record = render_job(pipe, jobfile, job, out_dir, compare=compare, device=device,
                                        step_callback=lambda i: steps_bar.update(1), repeats=repeats,
                                        write=cp_spec is None or state.is_main_process)
                except Exception as e:  # recorded and reported; the other jobs go on
                    failed += 1
                    record = {"job": job.index, "name": job.name, "hash": jobfile.hash_of(job), "status": "error",
                              "config": jobfile.config_of(job), "error": f"{type(e).__name__}: {e}"}
                    tqdm.write(f"attnproc render: job {job.index} failed: {record['error']}", file=sys.stderr)
                if record is None or (cp_spec is not None and not state.is_main_process):
                    continue  # a context-parallel rank's shard: the main process records the job
                record.update(record_id=uuid.uuid4().hex, jobfile=str(jobfile.source) if jobfile.source else None,
                              rank=rank, world_size=world, finished_at=time.time(),
                              **({"context_parallel": str(cp_spec)} if cp_spec is not None else {}))
                append_record(part, record)
            steps_bar.close()
            jobs_bar.close()
    state.wait_for_everyone()
    summary = {"out_dir": str(out_dir), "jobs": len(jobfile.jobs),
               "skipped": sum(h in done for h in hashes), "rendered_here": len(mine) - failed if pending else 0,
               "manifest": str(out_dir / MANIFEST)}
    if state.is_main_process:
        fold_parts(out_dir)
        now = current(read_records(out_dir), out_dir)
        summary["done"] = sum(now.get(h, {}).get("status") == "done" for h in hashes)
        summary["rendered"] = summary["done"] - summary["skipped"]
        summary["failed"] = len(hashes) - summary["done"]
    state.wait_for_everyone()
    return summary


@contextlib.contextmanager
def _shares(state, pending: list, cp_spec):
    """This process's jobs: its data-parallel share, or (context parallelism) every job."""
    if cp_spec is not None:
        yield pending
        return
    with state.split_between_processes(pending) as mine:
        yield mine


def job_records(jobfile: JobFile, out_dir: str | Path) -> list[dict]:
    """The current manifest record of each job of ``jobfile``, in job order (None where a job has none yet)."""
    now = current(read_records(Path(out_dir)), Path(out_dir))
    return [now.get(jobfile.hash_of(j)) for j in jobfile.jobs]
