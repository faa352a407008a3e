"""Per-layer attention speed of Radial and GNA vs dense SDPA at video shapes on this machine.

B=1, H=4, D=64, fp32 (CPU defaults) over latent grids 8x32x32 and 16x32x32. For every mask: median time of the
method's attention call, timed round-robin with dense SDPA (GNA: including the tile permutation), speedup over dense SDPA measured in the same run,
block density and the fraction of the ideal speedup 1/density that is reached.

    python benchmarks/sparse_speed.py            # -> benchmarks/results/sparse-speed-cpu.json
    python benchmarks/sparse_speed.py --quick    # one small grid, fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnproc
import attnproc.sparse.gna  # noqa: F401
import attnproc.sparse.radial  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"


def configs():
    return [
        ("radial reference, decay 1.0 (wan)", "radial", "wan", dict(decay=1.0, sink=True)),
        ("radial reference, decay 0.2 (wan default)", "radial", "wan", dict(decay=0.2, sink=True)),
        ("radial corrected, decay 0.2", "radial", "wan", dict(decay=0.2, sink=True, variant="corrected")),
        ("radial reference, decay 0.95 (hunyuan default)", "radial", "hunyuanvideo", dict(decay=0.95)),
        ("gna family default (window 0.6/0.5/0.3, stride=tile)", "gna", "hunyuanvideo", dict()),
        ("gna window 1/4 per side, stride=tile 2x8x8", "gna", "hunyuanvideo", dict(kernel_size=(2, 8, 8))),
    ]


def timed_pair(base, fn, reps):
    """Medians of ``base`` and ``fn`` timed round-robin (the same load affects both)."""
    base(), fn(), fn()
    tb, tf = [], []
    for _ in range(reps):
        t = time.perf_counter()
        base()
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        fn()
        tf.append(time.perf_counter() - t)
    return statistics.median(tb), statistics.median(tf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    grids = [(8, 16, 16)] if args.quick else [(8, 32, 32), (16, 32, 32)]
    reps = 3 if args.quick else 5
    torch.manual_seed(0)
    rows = []
    for grid in grids:
        N = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, 4, N, 64) for _ in range(3))
        layout = attnproc.TokenLayout(*grid)
        with torch.no_grad():
            for label, name, family, opts in configs():
                method = attnproc.create(name, dense_first_steps=0, **opts)
                if name == "radial":
                    method.config.dense_first_layers = 0
                site = attnproc.Site(family, None, "blocks.5.attn", 10, 5, "self", layout, None)
                if name == "radial":
                    bm, _ = method.block_mask_for(site)
                    density = bm.float().mean().item()
                    token_density = density
                else:
                    plan = method.plan_for(site)
                    density, token_density = plan.block_density, plan.token_density
                t_dense, t = timed_pair(lambda: F.scaled_dot_product_attention(q, k, v),
                                        lambda: method.attention(q, k, v, site), reps)
                sp = t_dense / t
                rows.append(dict(grid=list(grid), tokens=N, method=label, block_density=round(density, 4),
                                 token_density=round(token_density, 4), dense_ms=round(t_dense * 1e3, 1),
                                 ms=round(t * 1e3, 1), speedup=round(sp, 2),
                                 fraction_of_ideal=round(sp * density, 2)))
                print(f"{'x'.join(map(str, grid)):>9} {label:<54} density {density:6.3f} "
                      f"{t * 1e3:8.1f} ms  dense {t_dense * 1e3:8.1f} ms  speedup {sp:5.2f}x  "
                      f"of ideal {sp * density:4.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("sparse-speed-cpu-quick.json" if args.quick else "sparse-speed-cpu.json")
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, B=1, H=4, D=64, dtype="float32",
                note="CPU only (no GPU lent to this task); backend auto (compiled flex at these sizes)")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
