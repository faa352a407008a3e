"""``attnproc bench``: what a method buys on this machine, per attention layer and estimated per denoising step.

For one problem shape (a named layer of a real model, :mod:`attnproc.workflows.bench_shapes`, or an explicit one)
and one or more methods with their options, on the current device and dtype:

- the layer's self/joint attention call, dense SDPA vs ``method.attention`` on the same random q, k, v, warmed up
  and timed in alternating rounds (:func:`~attnproc.workflows.timing.compare_runs`: median, min, max, speedup per
  round, whether the difference is within noise);
- from one recorded call (:func:`~attnproc.kernels.record_kernel_calls`): the achieved density (query-key pairs
  the kernels computed, padding included, plus a joint call's dense text queries, over the dense call's pairs), the block-sparse kernel time and the rest of the method's time (selection, mask
  building, permutations) as overhead, and the backends ``auto`` picked;
- the fraction of the ideal speedup 1/density, and the peak memory of one call (CUDA allocator peak; on CPU the
  peak of live tensor bytes in torch's profiler);
- an *estimate* of the denoising-step speedup: one random-weight block of the real architecture (real width and
  heads, at the benchmarked grid, :func:`~attnproc.workflows.bench_shapes.layer_model`) gives the share of the
  block's time spent in the attention the method changes (for a scaled shape also extrapolated to the full grid:
  attention time x (S_full/S)^2, the rest x S_full/S); with the per-layer ratio measured above and the share of
  (step, layer) pairs the method's schedule runs sparse, Amdahl's law gives the step and whole-run speedups.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import attnproc
from attnproc.kernels import dense_attention, record_kernel_calls
from attnproc.kernels.autotune import device_name

from .bench_shapes import ProblemShape, layer_model, shape_named
from .render import AttentionTimer
from .timing import compare_runs, measure_runs

__all__ = ["MethodSpec", "bench", "format_table", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its options, as ``attnproc.create`` takes them."""

    name: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name + (f" ({', '.join(f'{k}={v}' for k, v in self.options.items())})" if self.options else "")


def _specs(methods) -> list[MethodSpec]:
    if isinstance(methods, (str, MethodSpec)):
        methods = [methods]
    return [m if isinstance(m, MethodSpec) else MethodSpec(m) if isinstance(m, str) else MethodSpec(*m)
            for m in methods]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[], dict]:
    """A run for :mod:`timing`: calls ``fn`` and returns its wall time as both total and attention time."""
    def run():
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - start
        return {"total_s": dt, "attention_s": dt}
    return run


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was live before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []  # allocations at their op's start, frees at its end: an upper bound of the live peak
    for e in prof.events():
        delta = e.self_cpu_memory_usage
        if delta:
            changes.append((e.time_range.start if delta > 0 else e.time_range.end, delta))
    live = peak = 0
    for _, delta in sorted(changes):
        live += delta
        peak = max(peak, live)
    return int(peak)


def _layout(shape: ProblemShape) -> attnproc.TokenLayout:
    return attnproc.TokenLayout(*shape.grid, text_len=shape.text_len if shape.text_position != "none" else 0,
                                text_position=shape.text_position)


def _site(shape, layout, step: int, layer: int) -> attnproc.Site:
    ctx = attnproc.StepContext(index=step, num_steps=shape.steps, timestep=1000.0 * (1 - step / shape.steps),
                               branch="cond", denoiser="transformer")
    return attnproc.Site(shape.family, "transformer", f"blocks.{layer}.attn1", 2 * layer, layer, shape.kind, layout,
                         ctx, base_layout=layout)


def _schedule(method, shape, layout) -> tuple[attnproc.Site, float | None]:
    """A site where the method takes its sparse path (late step, last layer first) and the share of the run's
    (step, layer) pairs that do; ``None`` for methods without a schedule."""
    last = _site(shape, layout, shape.steps - 1, shape.layers - 1)
    sparse_here = getattr(method, "sparse_here", None)
    if sparse_here is None:
        return last, None
    pairs = [(s, l) for s in range(shape.steps) for l in range(shape.layers)]
    sparse = [p for p in pairs if sparse_here(_site(shape, layout, *p))]
    return (_site(shape, layout, *sparse[-1]) if sparse else last), len(sparse) / len(pairs)


_EDIT_REASON = "a steering edit: it needs a pipeline's prompt and regions; measure it with `attnproc demo`"


def _create(spec: MethodSpec):
    """The method instance, or ``None`` for an edit given without options (it cannot be built without inputs)."""
    cls = attnproc.registry.REGISTRY.get(spec.name)
    if issubclass(cls, attnproc.Edit) and not spec.options:
        return None
    return attnproc.create(spec.name, **spec.options)


def _skip_reason(method, shape) -> str | None:
    """Why the per-layer bench cannot run ``method`` on ``shape`` (``None``: it can)."""
    if method is None or isinstance(method, attnproc.Edit):
        return _EDIT_REASON
    try:
        method.check_family(shape.family)
    except attnproc.UnsupportedFamilyError as exc:
        return str(exc).splitlines()[0]
    if method.computes_output and shape.family == "unet":
        return ("computes the whole attention module from its inputs (UNet); the per-layer bench times q/k/v "
                "calls only: measure it with `attnproc demo`")
    if method.needs_block_input and not method.computes_output:
        return "needs the transformer block's input, which a bare attention call does not have"
    return None


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _method_row(spec, method, shape, qkv, device, repeats, warmup, memory) -> dict:
    q, k, v = qkv
    layout = _layout(shape)
    row = {"label": spec.label, "method": spec.name, "options": spec.options}
    reason = _skip_reason(method, shape)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    site, sparse_share = _schedule(method, shape, layout)
    call = lambda: method.attention(q, k, v, site)  # noqa: E731
    dense = lambda: dense_attention(q, k, v)  # noqa: E731
    with torch.inference_mode():
        _, _, report = compare_runs(_timed(call, device), _timed(dense, device), repeats=repeats, warmup=warmup,
                                    names=(spec.label, "dense"))
        with record_kernel_calls() as calls:
            t = _timed(call, device)()["total_s"]
        mem = {"method": peak_bytes(call, device), "dense": peak_bytes(dense, device)} if memory else None
    ms = lambda s: {key: round(val * 1e3, 3) for key, val in s.items() if key in ("median", "min", "max")}  # noqa
    speed = report["speedup"]["attention"]
    row.update(status="ok", site={"step": site.step.index, "layer": site.layer}, sparse_share=sparse_share,
               time_ms=ms(report[spec.label]["attention_s"]), dense_ms=ms(report["dense"]["attention_s"]),
               speedup={k2: round(speed[k2], 3) for k2 in ("median", "min", "max")},
               within_noise=speed["within_noise"], peak_bytes=mem)
    B, H, S = q.shape[:3]
    if calls:  # computed pairs / dense pairs; a joint call's text queries run dense outside the kernel
        text_pairs = B * H * shape.text_len * S if shape.kind == "joint" else 0
        density = (sum(c["kept_pairs"] for c in calls) + text_pairs) / (B * H * S * k.shape[2])
        kernel_ms = sum(c["ms"] for c in calls)
        row.update(density=round(density, 4), ideal=round(1 / density, 3),
                   frac_ideal=round(speed["median"] * density, 3), recorded_ms=round(t * 1e3, 3),
                   kernel_ms=round(kernel_ms, 3), overhead_ms=round(t * 1e3 - kernel_ms, 3),
                   backends=sorted({c["backend"] for c in calls}),
                   backend_reasons=sorted({c["reason"] for c in calls}))
    else:
        row.update(density=None, note="no block-sparse kernel call (dense, or a method with its own kernel)")
    return row


def _share(shape, device, dtype, repeats, warmup) -> dict | None:
    """The attention share of one random-weight block of the architecture (dense), at ``shape``."""
    built = layer_model(shape, device=device, dtype=dtype)
    if built is None:
        return None
    model, kwargs = built
    handle = attnproc.apply(model, "dense")
    timer = AttentionTimer(handle.method)
    try:
        def run():
            before = timer.by_kind.get(shape.kind, 0.0)
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                model(**kwargs)
            _sync(device)
            return {"total_s": time.perf_counter() - start, "attention_s": timer.by_kind.get(shape.kind, 0.0) - before}
        _, timings = measure_runs(run, repeats=repeats, warmup=warmup)
    finally:
        attnproc.remove(model)
    total, attn = timings["total_s"]["median"], timings["attention_s"]["median"]
    out = {"block_ms": round(total * 1e3, 3), "attention_ms": round(attn * 1e3, 3), "share": round(attn / total, 4)}
    full = shape.full
    if full is not None and full.seq_len != shape.seq_len:  # attention time grows as S^2, the rest as S
        a = attn * (full.seq_len / shape.seq_len) ** 2
        o = (total - attn) * (full.seq_len / shape.seq_len)
        out["full_shape_share"] = round(a / (a + o), 4)
    return out


def _estimate(row: dict, share: dict | None) -> dict | None:
    """Amdahl: the step and whole-run speedups from the attention share and the measured per-layer ratio."""
    if share is None or row.get("status") != "ok":
        return None
    r = row["time_ms"]["median"] / row["dense_ms"]["median"]
    f = 1.0 if row["sparse_share"] is None else row["sparse_share"]
    out = {}
    for key, s in (("benchmarked", share["share"]), ("full_shape", share.get("full_shape_share"))):
        if s is None:
            continue
        out[key] = {"sparse_step": round(1 / ((1 - s) + s * r), 3),
                    "whole_run": round(1 / ((1 - s) + s * (f * r + 1 - f)), 3)}
    return out


def bench(methods, shape: ProblemShape | str, *, device: str | torch.device = "cpu",
          dtype: str | torch.dtype = "float32", repeats: int = 5, warmup: int = 1, e2e: bool = True,
          memory: bool = True, seed: int = 0, progress: bool = True) -> dict:
    """Benchmark ``methods`` (names, ``(name, options)`` pairs or :class:`MethodSpec`) on one layer of
    ``shape`` (a name from :data:`~attnproc.workflows.bench_shapes.SHAPES` or a :class:`ProblemShape`).

    Returns a JSON-ready report: ``machine`` (device, torch, threads, load), ``shape``, ``rows`` (one per method:
    times, speedup, density, fraction of ideal, overhead, backends, peak memory, ``estimate``) and ``share``
    (the measured attention share of one block). Options are checked before anything runs.
    """
    from tqdm.auto import tqdm

    shape = shape_named(shape) if isinstance(shape, str) else shape
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}; got {dtype!r}")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    specs = _specs(methods)
    made = [_create(s) for s in specs]  # OptionError before any work
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, shape.heads, shape.seq_len, shape.head_dim, generator=gen).to(device, dtype)
               for _ in range(3))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bar = tqdm(total=len(specs) + int(e2e), desc="bench", unit="step", disable=not progress, file=sys.stderr)
    rows = []
    for spec, method in zip(specs, made):
        bar.set_postfix_str(spec.label)
        rows.append(_method_row(spec, method, shape, (q, k, v), device, repeats, warmup, memory))
        bar.update()
    share = None
    if e2e:
        bar.set_postfix_str("one-block model")
        share = _share(shape, device, dtype, min(repeats, 2), min(warmup, 1))  # a whole block: fewer rounds
        bar.update()
    bar.close()
    for row in rows:
        row["estimate"] = _estimate(row, share)
    machine = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
               "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "platform": platform.platform(), "load_before": load,
               "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"machine": machine, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "warmup": warmup,
            "shape": shape.to_dict(), "share": share, "rows": rows,
            "statistic": "median (min-max) over alternating warm rounds of the method and dense SDPA; speedup = "
                         "dense / method per round; estimate = Amdahl from the one-block attention share"}


def format_table(report: dict) -> str:
    """The report as a terminal table, with the machine and shape it was measured on."""
    m, s = report["machine"], report["shape"]
    lines = [f"{s['label']}: {s['heads']} heads x {s['head_dim']}, grid {s['frames']}x{s['height']}x{s['width']} "
             f"({s['visual_len']} tokens) + {s['text_len']} text ({s['text_position']}), {report['dtype']}",
             f"measured on {m['device']}, torch {m['torch']}" + (f", {m['threads']} threads" if m["threads"] else "")
             + (f", load {m['load_before']:.1f}->{m['load_after']:.1f}" if m["load_before"] is not None else "")
             + f", {report['repeats']} alternating rounds after {report['warmup']} warm-up"]
    head = ("method", "density", "ms (min-max)", "dense ms", "speedup (min-max)", "of ideal", "overhead ms",
            "backend", "peak MiB", "est. step", "est. run")
    table = [head]
    for r in report["rows"]:
        if r["status"] != "ok":
            table.append((r["label"], f"skipped: {r['reason']}") + ("",) * (len(head) - 2))
            continue
        t, d, sp = r["time_ms"], r["dense_ms"], r["speedup"]
        est = (r.get("estimate") or {}).get("benchmarked") or {}
        mib = (f"{r['peak_bytes']['method'] / 2**20:.0f}/{r['peak_bytes']['dense'] / 2**20:.0f}"
               if r.get("peak_bytes") else "")
        table.append((
            r["label"], f"{r['density']:.3f}" if r.get("density") is not None else "-",
            f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})", f"{d['median']:.1f}",
            f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" + (" ~noise" if r["within_noise"] else ""),
            f"{r['frac_ideal']:.2f}" if r.get("frac_ideal") is not None else "-",
            f"{r['overhead_ms']:.1f}" if r.get("overhead_ms") is not None else "-",
            ",".join(r.get("backends", [])) or "-", mib,
            f"{est['sparse_step']:.2f}x" if est else "-", f"{est['whole_run']:.2f}x" if est else "-"))
    widths = [max(len(str(row[i])) for row in table if len(row) > i and not str(row[1]).startswith("skipped"))
              for i in range(len(head))]
    for row in table:
        if str(row[1]).startswith("skipped"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            lines.append("  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)))
    share = report.get("share")
    if share:
        full = f"; extrapolated to the full shape: {share['full_shape_share']:.2f}" if "full_shape_share" in share \
            else ""
        lines.append(f"attention share of one random-weight block (dense): {share['share']:.2f} "
                     f"({share['attention_ms']:.1f} of {share['block_ms']:.1f} ms){full}")
        lines.append("est. step / est. run: ESTIMATES of the denoising-step speedup (Amdahl, at the benchmarked "
                     "shape) at a sparse step / over the whole run with the method's dense steps and layers")
    return "\n".join(lines)
