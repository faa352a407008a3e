"""Peak memory of maskmod's score materialisation (CPU), per attention call.

Each configuration runs in a fresh subprocess: inputs are allocated, then ``resource.getrusage`` max RSS is
read before and after one attention call, so the difference is the call's own peak (torch allocations are
invisible to tracemalloc). Modes: ``dense`` (SDPA, what the stock processor does), ``inactive`` (maskmod at an
inactive step: must equal dense), ``active`` (scores materialised in head chunks of ``chunk_mb``) and
``active-unchunked`` (all heads at once). ``scores_mib`` is the analytic size of one call's fp32 score matrix
for the modulated (cond) half.

    python benchmarks/maskmod_memory.py            # writes benchmarks/results/maskmod-memory.json
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

# SD 1.5 at 512x512: latent 64x64, 8 heads, head dim 320/8, 640/8, 1280/8 per level; text 77; CFG batch 2.
SD15 = [
    {"name": "sd15-512 self 64x64", "grid": [1, 64, 64], "heads": 8, "dim": 40, "kind": "self", "batch": 2},
    {"name": "sd15-512 cross 64x64", "grid": [1, 64, 64], "heads": 8, "dim": 40, "kind": "cross", "text": 77, "batch": 2},
    {"name": "sd15-512 self 32x32", "grid": [1, 32, 32], "heads": 8, "dim": 80, "kind": "self", "batch": 2},
    {"name": "sd15-512 self 16x16", "grid": [1, 16, 16], "heads": 8, "dim": 160, "kind": "self", "batch": 2},
]
# A small Wan-2.1-1.3B-like video: 9 frames of 256x320 pixels -> 3 latent frames of 16x20 tokens (patch 2),
# 12 heads of 128, UMT5 text 512, cond and uncond in separate passes (batch 1).
VIDEO = [
    {"name": "wan-small self 3x16x20", "grid": [3, 16, 20], "heads": 12, "dim": 128, "kind": "self", "batch": 1},
    {"name": "wan-small cross 3x16x20", "grid": [3, 16, 20], "heads": 12, "dim": 128, "kind": "cross", "text": 512,
     "batch": 1},
    {"name": "wan-medium self 5x30x52", "grid": [5, 30, 52], "heads": 12, "dim": 128, "kind": "self", "batch": 1},
]
MODES = ["dense", "inactive", "active", "active-unchunked"]


def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def one(cfg: dict, mode: str) -> dict:
    import torch

    import attnproc
    import attnproc.steer.maskmod as mm
    from attnproc.context import StepContext
    from attnproc.method import _DENSE
    from attnproc.site import Site

    torch.set_num_threads(2)
    f, h, w = cfg["grid"]
    q_len = f * h * w
    k_len = cfg.get("text", q_len) if cfg["kind"] == "cross" else q_len
    B, H, D = cfg["batch"], cfg["heads"], cfg["dim"]
    q = torch.randn(B, H, q_len, D)
    k = torch.randn(B, H, k_len, D)
    v = torch.randn(B, H, k_len, D)
    chunk = 1 << 20 if mode == "active-unchunked" else 256
    method = mm.MaskMod(mm.MaskModConfig(regions=[{"tokens": [1, 2], "box": [0, 0, 0.5, 1]},
                                                   {"tokens": [4], "box": [0.5, 0, 1, 1]}], chunk_mb=chunk))
    method.bind(None)
    branches = ("uncond", "cond") if B == 2 else ("cond",)
    lay = attnproc.TokenLayout(f, h, w, text_len=k_len if cfg["kind"] == "cross" else 0,
                               text_position="separate" if cfg["kind"] == "cross" else "none", branches=branches)
    index = 20 if mode == "inactive" else 0
    step = StepContext(index, 50, 981.0 if index == 0 else 581.0, "batched" if B == 2 else "cond")
    site = Site("unet", "unet", "x", 0, 0, cfg["kind"], lay, step)
    if mode != "dense":  # build the per-grid maps outside the measurement (cached across layers and steps)
        method.grid_maps(site)
    before = _maxrss_mib()
    with torch.no_grad():
        out = _DENSE.attention(q, k, v, site) if mode == "dense" else method.edit(q, k, v, site, inner=_DENSE)
    peak = _maxrss_mib() - before
    del out
    cond = B // 2 if B == 2 else B
    return {"config": cfg["name"], "mode": mode, "peak_mib": round(peak, 1),
            "scores_mib": round(cond * H * q_len * k_len * 4 / 2**20, 1),
            "queries": q_len, "keys": k_len, "heads": H, "batch": B}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(json.loads(sys.argv[2]), sys.argv[3])))
        return
    rows = []
    for cfg in SD15 + VIDEO:
        for mode in MODES:
            res = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg), mode], capture_output=True,
                                 text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['config']:28s} {mode:17s} peak {row['peak_mib']:8.1f} MiB   scores {row['scores_mib']:8.1f} MiB",
                  flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "maskmod-memory.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"device": "cpu", "dtype": "float32", "chunk_mb": 256, "rows": rows}, fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
