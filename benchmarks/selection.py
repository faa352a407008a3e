"""Query-dependent selection (VMoBA, Rectified SpaAttn) on this CPU: selection overhead and per-layer speed.

B=1, H=4, D=64, fp32, random q/k/v. Two tables:

* overhead: time of the selection alone (VMoBA: permutation + gate + chunk selection for each of the 1D/2D/3D
  layers; Rectified: Gilbert permutation + pooling, GAPR and critical-block selection) as a share of dense SDPA
  over the same tokens, at 8K, 16K and 32K tokens (grids 8/16/32 x 32 x 32);
* speed: the whole visual attention (permutations, selection, sparse attention, merge) against dense SDPA at
  8x32x32 and 16x32x32, timed round-robin, with the attended fraction (density) and the fraction of the ideal
  speedup 1/density reached.

Medians with min/max over the repetitions; results in benchmarks/results/selection-cpu.json.

    nice -n 10 python benchmarks/selection.py            # full run
    python benchmarks/selection.py --quick               # 4x16x16 only, to check the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnproc.layout import TokenLayout
from attnproc.sparse.gilbert import gilbert_block_neighbors, gilbert_permutation
from attnproc.sparse.rectified import RectifiedConfig, rectified_plan, rectified_visual_attention
from attnproc.sparse.select import permutation_partition
from attnproc.sparse.vmoba import (VMoBAConfig, select_chunks, selected_share, vmoba_gate, vmoba_partition,
                                  vmoba_visual_attention)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fns: dict, reps: int, warm_dense: bool = True) -> dict:
    """Round-robin timing (one warm-up call each; dense SDPA too unless ``warm_dense`` is False):
    ``{name: [seconds, ...]}``."""
    for name, fn in fns.items():
        if warm_dense or name != "dense":
            fn()
    out = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[n].append(time.perf_counter() - t)
    return out


def stats(ts):
    return dict(median_ms=round(statistics.median(ts) * 1e3, 1), min_ms=round(min(ts) * 1e3, 1),
                max_ms=round(max(ts) * 1e3, 1))


def vmoba_select(cfg, grid, q, k, layer):
    part = vmoba_partition(grid, cfg.chunk_for(grid, layer))
    qp, kp = part.permute(q), part.permute(k)
    sel = select_chunks(vmoba_gate(qp, kp, part), part, select=cfg.select, threshold_type=cfg.threshold_type,
                        tau=cfg.tau, topk=cfg.topk_for(part.num_chunks))
    return part, sel


def rect_select(cfg, grid, q, k, v):
    N, bs = math.prod(grid), cfg.block_size
    perm, _ = gilbert_permutation(grid)
    part = permutation_partition(perm, N, bs)
    nq = part.num_chunks
    crit, *_ = rectified_plan(part.permute(q), part.permute(k), part.permute(v), None, scale=q.shape[-1] ** -0.5,
                              block_size=bs, top_k=int((1 - cfg.drop_rate) * nq), p_remain=cfg.p_remain,
                              first_frame_blocks=nq // grid[0], neighbors=gilbert_block_neighbors(grid, bs),
                              ipar=False)
    return crit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, overloaded CPU every multi-threaded op waits ~20 ms "
                         "for descheduled workers, which swamps small selection ops; dense uses the same setting)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    over_grids = [(4, 16, 16)] if args.quick else [(8, 32, 32), (16, 32, 32), (32, 32, 32)]
    speed_grids = [(4, 16, 16)] if args.quick else [(8, 32, 32), (16, 32, 32)]
    reps = 2 if args.quick else 3
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("selection-cpu-quick.json" if args.quick else "selection-cpu.json")
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, B=1, H=4, D=64, dtype="float32", reps=reps,
                reps_32k=1, load_average_start=os.getloadavg(),
                note="shared 2-core CPU (load average far above 2 while measured), no GPU lent; backend auto "
                     "(VMoBA: gather with LSE; Rectified: flex/gather); 32K: one repetition, dense not warmed")

    def save():
        out.write_text(json.dumps(dict(meta=meta, overhead=overhead, speed=speed), indent=1))
    vm = {s: VMoBAConfig(setting=s).resolved("wan") for s in ("training_free", "training")}
    rc = RectifiedConfig().resolved("wan")
    overhead, speed = [], []

    def run_overhead(grid):
        N = math.prod(grid)
        q, k, v = (torch.randn(1, 4, N, 64) for _ in range(3))
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
        for s, cfg in vm.items():
            for layer in range(3):
                fns[f"vmoba {s} layer {layer}"] = (lambda c=cfg, l=layer: vmoba_select(c, grid, q, k, l))
        fns["rectified wan"] = lambda: rect_select(rc, grid, q, k, v)
        big = N > 20000
        res = timed(fns, 1 if big else reps, warm_dense=not big)
        dense = statistics.median(res.pop("dense"))
        for name, ts in res.items():
            row = dict(grid=list(grid), tokens=N, selection=name, **stats(ts), dense_ms=round(dense * 1e3, 1),
                       share_of_dense=round(statistics.median(ts) / dense, 4))
            overhead.append(row)
            save()
            print(f"overhead {N:6d} {name:<32} {row['median_ms']:9.1f} ms = {row['share_of_dense']:.3f} of dense "
                  f"({row['dense_ms']:.0f} ms)", flush=True)

    def run_speed(grid):
        N = math.prod(grid)
        q, k, v = (torch.randn(1, 4, N, 64) for _ in range(3))
        layout = TokenLayout(*grid)
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
        dens = {}
        for s, cfg in vm.items():
            for layer in range(3):
                name = f"vmoba {s} layer {layer}"
                fns[name] = (lambda c=cfg, l=layer: vmoba_visual_attention(q, k, v, None, None, None, config=c,
                                                                             layout=layout, layer_index=l))
                dens[name] = selected_share(*vmoba_select(cfg, grid, q, k, layer))
        fns["rectified wan"] = lambda: rectified_visual_attention(q, k, v, None, None, None, config=rc,
                                                                  layout=layout)
        dens["rectified wan"] = float(rect_select(rc, grid, q, k, v).float().mean())
        res = timed(fns, reps)
        td = res.pop("dense")
        dense = statistics.median(td)
        for name, ts in res.items():
            sp = dense / statistics.median(ts)
            row = dict(grid=list(grid), tokens=N, method=name, **stats(ts), dense=stats(td),
                       speedup=round(sp, 2), density=round(dens[name], 4),
                       fraction_of_ideal=round(sp * dens[name], 3))
            speed.append(row)
            save()
            print(f"speed {'x'.join(map(str, grid)):>9} {name:<32} density {dens[name]:.3f} "
                  f"{row['median_ms']:9.1f} ms  dense {dense * 1e3:9.1f} ms  speedup {sp:5.2f}x  "
                  f"of ideal {sp * dens[name]:.2f}", flush=True)

    with torch.no_grad():  # the slowest (32K dense) last, so a cut-short run still has the rest saved
        for grid in over_grids[:2]:
            run_overhead(grid)
        for grid in speed_grids:
            run_speed(grid)
        for grid in over_grids[2:]:
            run_overhead(grid)
    meta["load_average_end"] = os.getloadavg()
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
