"""Fidelity of Radial and GNA against dense attention (relative L2 error and PSNR).

1. Synthetic queries/keys with spatio-temporal locality on a video grid: q and k are smooth random functions of
   the token's (frame, row, column) position plus noise, so nearby tokens attend each other most (as in video
   DiTs). Attention output of each mask vs dense.
2. The tiny random-weight pipelines (attnproc.pipelines.tiny_pipeline) of every supported family: the final
   latent output and the per-call attention output vs dense, every step sparse (dense_first_steps=0, no dense
   layers) and small blocks so the tiny grids are actually sparse. Random weights: these numbers show the
   plumbing's faithfulness, not the quality on trained models.
3. The corrected Radial variant against the reference one (both vs dense, same inputs).

    python benchmarks/sparse_fidelity.py      # -> benchmarks/results/sparse-fidelity.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import attnproc
import attnproc.sparse.gna  # noqa: F401
import attnproc.sparse.radial  # noqa: F401
from attnproc.kernels import dense_attention
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def rel_l2(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def psnr(x, ref):
    mse = ((x - ref) ** 2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def local_qkv(grid, heads=4, dim=64, sharp=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid
    t, y, x = torch.meshgrid(torch.arange(T) / 4.0, torch.arange(H) / 8.0, torch.arange(W) / 8.0, indexing="ij")
    pos = torch.stack([t, y, x], -1).reshape(-1, 3)
    freqs = torch.randn(3, dim // 2, generator=g)
    feat = torch.cat([torch.sin(pos @ freqs), torch.cos(pos @ freqs)], -1) * sharp  # [N, dim], smooth in pos
    qs, ks, vs = [], [], []
    for _ in range(heads):
        rot = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
        base = feat @ rot
        qs.append(base + 0.3 * torch.randn(base.shape, generator=g))
        ks.append(base + 0.3 * torch.randn(base.shape, generator=g))
        vs.append(torch.randn(base.shape, generator=g))
    return tuple(torch.stack(a)[None] for a in (qs, ks, vs))


SYNTH = [
    ("radial reference decay 1.0", "radial", "wan", dict(decay=1.0, sink=True)),
    ("radial reference decay 0.2 (wan)", "radial", "wan", dict(decay=0.2, sink=True)),
    ("radial corrected decay 0.2 (wan)", "radial", "wan", dict(decay=0.2, sink=True, variant="corrected")),
    ("radial reference decay 0.95 (hunyuan)", "radial", "hunyuanvideo", dict(decay=0.95)),
    ("radial corrected decay 0.95 (hunyuan)", "radial", "hunyuanvideo", dict(decay=0.95, variant="corrected")),
    ("gna family default (stride = tile)", "gna", "hunyuanvideo", dict()),
    ("gna NA window 5x15x15 stride 1 (exact)", "gna", "hunyuanvideo", dict(kernel_size=(5, 15, 15), stride=1)),
    ("gna same window, whole tiles (exact=False)", "gna", "hunyuanvideo",
     dict(kernel_size=(5, 15, 15), stride=1, exact=False)),
]


def density_of(method, site):
    if method.name == "radial":
        bm, _ = method.block_mask_for(site)
        return bm.float().mean().item()
    return method.plan_for(site).block_density


def synthetic(grid):
    q, k, v = local_qkv(grid)
    ref = dense_attention(q, k, v)
    layout = attnproc.TokenLayout(*grid)
    rows = []
    for label, name, fam, opts in SYNTH:
        extra = dict(dense_first_layers=0) if name == "radial" else {}
        m = attnproc.create(name, dense_first_steps=0, **extra, **opts)
        site = attnproc.Site(fam, None, "blocks.5.attn", 10, 5, "self", layout, None)
        out = m.attention(q, k, v, site)
        rows.append(dict(grid=list(grid), method=label, block_density=round(density_of(m, site), 4),
                         rel_l2=round(rel_l2(out, ref), 4), psnr_db=round(psnr(out, ref), 2)))
        print(f"synthetic {'x'.join(map(str, grid)):>8} {label:<46} density {rows[-1]['block_density']:.3f} "
              f"relL2 {rows[-1]['rel_l2']:.4f} PSNR {rows[-1]['psnr_db']:.1f} dB", flush=True)
    return rows


PIPES = {  # family -> (call overrides, [(label, method, options)])
    "wan21": (dict(num_frames=17, height=128, width=128), None),
    "hunyuanvideo": (dict(num_frames=17, height=128, width=128), None),
    "cogvideox": (dict(num_frames=17, height=128, width=128), None),
    "ltx": (dict(num_frames=33, height=256, width=256), None),
    "flux": (dict(height=128, width=128), None),
}


def pipeline_rows():
    rows = []
    for family, (over, _) in PIPES.items():
        pipe = tiny_pipeline(family)
        kw = tiny_call_kwargs(family, num_inference_steps=4, output_type="latent", **over)

        def run():
            kw["generator"] = torch.Generator().manual_seed(0)
            r = pipe(**kw)
            x = r.frames if hasattr(r, "frames") else r.images
            return torch.as_tensor(np.asarray(x))

        dense = run()
        variants = []
        if family != "flux":
            variants += [("radial reference", "radial", dict(dense_first_layers=0, block_size=16, decay=0.5)),
                         ("radial corrected", "radial",
                          dict(dense_first_layers=0, block_size=16, decay=0.5, variant="corrected"))]
        gk = dict(kernel_size=(4, 4), stride=(4, 4), tile=(4, 4)) if family == "flux" else \
            dict(kernel_size=(1, 4, 4), stride=(1, 4, 4), tile=(1, 4, 4))
        variants.append(("gna 4x4 tiles, window 4x4", "gna", gk))
        for label, name, opts in variants:
            handle = attnproc.apply(pipe, name, dense_first_steps=0, **opts)
            method = handle.method
            inner = method.attention
            errs = []

            def attention(q, k, v, site, *, attn_mask=None, scale=None, inner=inner, errs=errs):
                out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
                if site.kind != "cross":
                    errs.append(rel_l2(out, dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)))
                return out

            method.attention = attention
            out = run()
            attnproc.remove(pipe)
            layout = next(iter(handle.last_layouts().values()))
            rows.append(dict(family=family, grid=list(layout.grid), method=label,
                             attention_rel_l2_mean=round(float(np.mean(errs)), 4),
                             output_rel_l2=round(rel_l2(out, dense), 4), output_psnr_db=round(psnr(out, dense), 2)))
            print(f"pipeline {family:<13} {'x'.join(map(str, layout.grid)):>7} {label:<28} attn relL2 "
                  f"{rows[-1]['attention_rel_l2_mean']:.4f}  output relL2 {rows[-1]['output_rel_l2']:.4f} "
                  f"PSNR {rows[-1]['output_psnr_db']:.1f} dB", flush=True)
    return rows


def main():
    torch.manual_seed(0)
    with torch.no_grad():
        synth = synthetic((8, 16, 16)) + synthetic((12, 24, 20))
        pipes = pipeline_rows()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sparse-fidelity.json"
    out.write_text(json.dumps(dict(note="random-weight tiny pipelines and synthetic local q/k; not trained models",
                                   synthetic=synth, pipelines=pipes), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
