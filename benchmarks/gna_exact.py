"""Peak memory and time of exact GNA (windows that are not tile-aligned) against the dense masked oracle and the
tile-aligned fast path, at 8x32x32 and 16x48x80 (a Wan-480p-like) token grids.

Each (grid, path) runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor buffer is
mmapped and returned on free, so RSS follows live memory). One warm-up call (compiles flex), then the peak is
read exactly: ``/proc/self/clear_refs`` resets the high-water mark, ``VmHWM - VmRSS`` after one call is that
call's peak above what was live before it (inputs, plan and masks excluded). Then ``reps`` warm timed calls:
median, min and max.

Paths: ``exact-flex`` / ``exact-gather`` (attnproc.sparse.gna_exact with backend flex / gather), ``dense-masked``
(SDPA with the ``N x N`` token mask: the oracle) and ``aligned-fast`` (a tile-aligned window of similar size on
the block-sparse kernel, auto backend: flex on CPU at these sizes). B=1, H=2, D=64, fp32, no text tokens.

    python benchmarks/gna_exact.py            # -> benchmarks/results/gna-exact-cpu.json
    python benchmarks/gna_exact.py --quick    # the small grid only, fewer repetitions
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
H, D = 2, 64
GRIDS = {
    # grid: (exact window, exact stride, aligned window, aligned stride); tile 2x8x8 (auto) for both
    (8, 32, 32): ((5, 15, 15), (1, 1, 1), (6, 24, 8), (2, 8, 8)),
    (16, 48, 80): ((5, 15, 15), (1, 1, 1), (6, 24, 24), (2, 8, 8)),
}
DENSE_MASK_LIMIT = 16384   # tokens: above it the N x N mask (and SDPA's float copy) does not fit this shared box


def _mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(grid: tuple, path: str, reps: int) -> dict:
    import torch

    from attnproc.kernels import block_sparse_attention, dense_attention
    from attnproc.sparse.gna import gna_mask, gna_plan
    from attnproc.sparse.gna_exact import exact_gna_attention, gna_token_window

    torch.manual_seed(0)
    k_exact, s_exact, k_al, s_al = GRIDS[grid]
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
    if path == "aligned-fast":
        plan = gna_plan(grid, k_al, s_al, tile=(2, 8, 8))
        assert plan.aligned
        bm, perm, inv = plan.block_mask[None, None], plan.perm, plan.inverse

        def call():
            return block_sparse_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], bm, plan.block_size)[:, :, inv]
    else:
        plan = gna_plan(grid, k_exact, s_exact, tile=(2, 8, 8))
        assert not plan.aligned
        if path == "dense-masked":
            mask = gna_mask(grid, k_exact, s_exact)

            def call():
                return dense_attention(q, k, v, attn_mask=mask)
        else:
            window = gna_token_window(plan)

            def call():
                return exact_gna_attention(plan, window, q, k, v, backend=path.split("-")[1])
    with torch.no_grad():
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                                  # reset VmHWM to the current RSS
        before = _mib("VmRSS")
        out = call()
        peak = _mib("VmHWM") - before
        del out
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return {"grid": list(grid), "tokens": n, "path": path, "peak_mib": round(peak, 1), "first_call_s": round(first, 2),
            "median_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1),
            "max_ms": round(1000 * max(times), 1), "reps": reps,
            "window": list(k_al if path == "aligned-fast" else k_exact),
            "stride": list(s_al if path == "aligned-fast" else s_exact),
            "token_density": round(plan.token_density, 4), "block_density": round(plan.block_density, 4),
            "qkv_mib": round(3 * H * n * D * 4 / 2**20, 1)}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(one(tuple(json.loads(sys.argv[2])), sys.argv[3], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for grid in list(GRIDS)[:1] if args.quick else GRIDS:
        n = grid[0] * grid[1] * grid[2]
        for path in ("exact-flex", "exact-gather", "dense-masked", "aligned-fast"):
            if path == "dense-masked" and n > DENSE_MASK_LIMIT:
                rows.append({"grid": list(grid), "tokens": n, "path": path, "skipped": (
                    f"not run: its bool mask alone is {n * n / 2**30:.1f} GiB (N x N) and SDPA adds a float copy "
                    f"({4 * n * n / 2**30:.1f} GiB) on a shared 23 GiB machine")})
                print(rows[-1], flush=True)
                continue
            reps = 3 if args.quick or n > DENSE_MASK_LIMIT else 5
            res = subprocess.run([sys.executable, __file__, "--one", json.dumps(grid), path, str(reps)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                rows.append({"grid": list(grid), "tokens": n, "path": path, "failed": res.stderr[-500:]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    out = RESULTS / ("gna-exact-cpu-quick.json" if args.quick else "gna-exact-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "machine": platform.processor() or platform.machine(),
                               "threads": os.cpu_count(), "dtype": "float32", "B": 1, "H": H, "D": D,
                               "note": "shared 2-core VM under heavy load from other work: times are noisy",
                               "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
