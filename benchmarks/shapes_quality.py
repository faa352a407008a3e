"""Trained quality of the shapes models, measured by the detector (dense attention).

Fixed held-out prompts (dataset captions of seeds ≥ 2·10⁹, never trained on) × generation seeds
0..n-1, each model at its ``shapes_call_kwargs``; rates of colour / kind / count (and motion for
video) correct, as judged by ``attnproc.pipelines.shapes_detect.verdict``, each with its 95 % Wilson
interval: at n = 64 a rate of 0.8 is only known to ±0.1, which is why the default set is 256.

    python benchmarks/shapes_quality.py [--n 256]   # -> benchmarks/results/shapes-quality.json
    # a retrained folder in place of the packaged model (e.g. the default flux recipe's output):
    python benchmarks/shapes_quality.py --kinds flux --folder flux=DIR --out benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from attnproc.pipelines.shapes_models import KINDS, eval_prompts, generate, quality, shapes_call_kwargs, shapes_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def wilson(rate: float, n: int, z: float = 1.96) -> list[float]:
    """95 % interval of a rate measured on ``n`` samples (Wilson score)."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return [round(float(centre - half), 3), round(float(centre + half), 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="prompts × seeds per model (default 256)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--out", type=Path, default=RESULTS / "shapes-quality.json")
    ap.add_argument("--folder", action="append", default=[], metavar="KIND=DIR",
                    help="measure the diffusers folder DIR (e.g. a `shapes train` --out) instead of the packaged KIND")
    a = ap.parse_args()
    folders = dict(f.split("=", 1) for f in a.folder if "=" in f)
    if len(folders) != len(a.folder) or set(folders) - set(a.kinds):
        ap.error(f"--folder takes KIND=DIR with KIND among --kinds {a.kinds}, got {a.folder}")
    torch.set_num_threads(1)
    results = {}
    for kind in a.kinds:
        prompts = eval_prompts(kind, a.n)
        q = quality(prompts, generate(shapes_pipeline(kind, folders.get(kind)), kind, prompts, list(range(a.n))))
        call = {k: v for k, v in shapes_call_kwargs(kind, "").items() if k != "prompt"}
        rates = {k: v for k, v in q.items() if k not in ("verdicts", "n")}
        results[kind] = {"call": call, "folder": folders.get(kind, "packaged"), "n": q["n"], **rates,
                         "interval95": {k: wilson(v, q["n"]) for k, v in rates.items()},
                         "failures": [v for v in q["verdicts"] if not all(v[k] for k in ("colour", "kind", "count"))][:8]}
        print(kind, {k: v for k, v in results[kind].items() if k not in ("failures", "call", "interval95")})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
