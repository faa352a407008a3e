"""Per-layer speed of SLA vs dense SDPA and vs plain block-sparse attention at the same top-k (CPU, inference).

B=1, H=4, D=64, fp32, blocks 64x64 (SLA's default), sequence lengths 8K-32K. Per length and top-k, timed
round-robin (the same machine load hits every entry): dense SDPA; plain block-sparse attention with SLA's block
map (kernel only, map given); SLA's block map alone; SLA ``main`` and ``sla1`` (map + sparse + linear branch +
projection). Median and spread (min, max) in ms; speedups over dense from the medians of the same run.

    nice -n 10 python benchmarks/sla_speed.py            # -> benchmarks/results/sla-speed-cpu.json
    python benchmarks/sla_speed.py --quick               # 4K tokens, 2 repetitions (smoke run)
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

from attnproc.kernels import block_sparse_attention
from attnproc.sparse.sla import sla_attention, sla_block_map

RESULTS = Path(__file__).resolve().parent / "results"
B, H, D, BLOCK = 1, 4, 64, 64


def round_robin(fns: dict, reps: int) -> dict:
    """Per entry: every repetition's seconds, the entries interleaved (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    lengths = [4096] if args.quick else [8192, 16384, 32768]
    topks = [0.1] if args.quick else [0.1, 0.2]
    reps = 2 if args.quick else args.reps
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for L in lengths:
            q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
            W, bias = torch.randn(D, D) * 0.02, torch.zeros(D)
            for topk in topks:
                bm = sla_block_map(q, k, block_q=BLOCK, block_k=BLOCK, topk=topk)
                fns = {
                    "dense": lambda: F.scaled_dot_product_attention(q, k, v),
                    "block_sparse": lambda: block_sparse_attention(q, k, v, bm, BLOCK),
                    "block_map": lambda: sla_block_map(q, k, block_q=BLOCK, block_k=BLOCK, topk=topk),
                    "sla_main": lambda: sla_attention(q, k, v, W, bias, topk=topk, variant="main"),
                    "sla_sla1": lambda: sla_attention(q, k, v, W, bias, topk=topk, variant="sla1"),
                }
                times = round_robin(fns, reps)
                med = {n: statistics.median(t) for n, t in times.items()}
                row = dict(tokens=L, topk=topk, density=round(float(bm.float().mean()), 4), reps=reps)
                for n, t in times.items():
                    row[n] = dict(median_ms=round(med[n] * 1e3, 1), min_ms=round(min(t) * 1e3, 1),
                                  max_ms=round(max(t) * 1e3, 1))
                for n in ("block_sparse", "sla_main", "sla_sla1"):
                    row[f"speedup_{n}"] = round(med["dense"] / med[n], 2)
                row["sla_main_over_block_sparse"] = round(med["sla_main"] / med["block_sparse"], 2)
                row["sla_sla1_over_block_sparse"] = round(med["sla_sla1"] / med["block_sparse"], 2)
                rows.append(row)
                print(f"L={L:6d} topk={topk:.2f}  " + "  ".join(
                    f"{n} {row[n]['median_ms']:.0f} [{row[n]['min_ms']:.0f}-{row[n]['max_ms']:.0f}]" for n in fns)
                    + f"  ms | speedup main {row['speedup_sla_main']}x sla1 {row['speedup_sla_sla1']}x "
                      f"block-sparse {row['speedup_block_sparse']}x", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("sla-speed-cpu-quick.json" if args.quick else "sla-speed-cpu.json")
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, B=B, H=H, D=D, block=BLOCK, dtype="float32", mode="inference (no grad)",
                note="CPU only; block-sparse backend auto (compiled flex at these sizes); shared 2-core VM")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
