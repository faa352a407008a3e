"""torch.compile with attnproc: graph breaks, recompiles and time per step, stock vs dense vs radial.

The tiny Wan 2.1 pipeline (attnproc.pipelines, CFG as two passes), its transformer compiled with
``model.compile(backend=...)`` after ``apply``. For each variant, a 10-step run from a cold compile cache counts
dynamo's graph breaks (with the reasons, deduplicated), the graphs compiled, and the recompiles after the first
step; ``--repeats`` warm runs of the same length then give the time per step (median and spread over their
steps after the first).

    python benchmarks/compile.py                      # -> benchmarks/results/compile-cpu.json
    python benchmarks/compile.py --backend eager      # dynamo only (fast to compile; same breaks and recompiles)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import attnproc
import attnproc.sparse.radial  # noqa: F401
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"stock": None, "dense": ("dense", {}), "radial": ("radial", {})}


def run(pipe, steps: int):
    """One generation; the wall time at the end of each step (from the step-end callback)."""
    marks = [time.perf_counter()]

    def mark(p, i, t, kwargs):
        marks.append(time.perf_counter())
        return kwargs
    pipe(**tiny_call_kwargs("wan21", num_inference_steps=steps, output_type="latent"), callback_on_step_end=mark)
    return [b - a for a, b in zip(marks, marks[1:])]


def _reasons(breaks: dict) -> dict:
    """Graph-break counts per reason: dynamo's headline and its explanation (which names the function)."""
    out: dict[str, int] = {}
    for text, n in breaks.items():
        lines = text.splitlines()
        why = next((line.strip() for line in lines if line.strip().startswith("Explanation:")), "")
        key = f"{lines[0][:100]} | {why[13:180]}" if why else lines[0][:160]
        out[key] = out.get(key, 0) + n
    return out


def measure(variant: str, backend: str, steps: int, repeats: int) -> dict:
    pipe = tiny_pipeline("wan21")
    if VARIANTS[variant] is not None:
        name, options = VARIANTS[variant]
        attnproc.apply(pipe, name, **options)
    pipe.transformer.compile(backend=backend)
    torch._dynamo.reset()
    counters.clear()
    graphs_after_first = []

    def first_step(p, i, t, kwargs):
        if i == 0:
            graphs_after_first.append(counters["stats"]["unique_graphs"])
        return kwargs
    cold_start = time.perf_counter()
    pipe(**tiny_call_kwargs("wan21", num_inference_steps=steps, output_type="latent"), callback_on_step_end=first_step)
    cold = time.perf_counter() - cold_start
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    warm = [t for _ in range(repeats) for t in run(pipe, steps)[1:]]
    return dict(variant=variant, graph_breaks=sum(breaks.values()),
                graph_break_reasons=_reasons(breaks),
                graphs=graphs, recompiles_after_first_step=graphs - graphs_after_first[0],
                cold_run_s=round(cold, 3), step_s_median=round(statistics.median(warm), 5),
                step_s_min=round(min(warm), 5), step_s_max=round(max(warm), 5))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for variant in VARIANTS:
        row = measure(variant, args.backend, args.steps, args.repeats)
        print(json.dumps(row))
        rows.append(row)
    meta = dict(torch=torch.__version__, device="cpu", threads=torch.get_num_threads(), backend=args.backend,
                steps=args.steps, repeats=args.repeats, machine=platform.machine(), pipeline="tiny wan21 (attnproc.pipelines), 128x128x9",
                note="graph breaks/recompiles counted by torch._dynamo counters over a cold 10-step run; step times "
                     "from --repeats warm runs (median and range over their steps 2..N)",
                load_average=os.getloadavg()[0])
    out = Path(args.out) if args.out else RESULTS / f"compile-cpu{'' if args.backend == 'inductor' else '-' + args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(out)


if __name__ == "__main__":
    main()
