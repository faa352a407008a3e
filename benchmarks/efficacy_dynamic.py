"""Efficacy of the query-dependent methods (vmoba, rectified) and of agent against plain ToMe, on the shapes models.

The same measurement as ``benchmarks/efficacy.py`` (its ``sparse_rows``: PSNR/SSIM against dense, the detector's
rates and per-sample agreement with dense), with what that script does not have:

* the **achieved density** of vmoba and rectified: both choose their blocks per call, so there is no static mask;
  a probe subclass of each method records, for every sparse call, the share of visual (query, key) pairs its
  selection computes exactly (vmoba: the chosen chunks; rectified: the critical blocks, the rest being GAPR's pooled
  estimate), and the row reports their mean over all sparse calls of the run;
* **agent vs plain ToMe** on sd15 at three merge ratios: ``agents=False`` is tomesd's method (merge, softmax over the
  merged tokens, unmerge) with the same windows, schedule and merge ratio, so the pair isolates the agents' effect;
  the tomesd recipe itself (2x2 windows throughout) is one more row;
* the generic DiT agent variant (``dit=True``, agents pooled from the queries) on flux and wan21.

    nice -n 10 python benchmarks/efficacy_dynamic.py [--n 24]   # -> benchmarks/results/efficacy-dynamic.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from efficacy import ALL_SPARSE, RESULTS, sparse_rows

from attnproc.pipelines.shapes_models import shapes_pipeline
from attnproc.registry import register
from attnproc.sparse.rectified import RectifiedSpaAttn, rectified_visual_attention
from attnproc.sparse.vmoba import VMoBA, vmoba_visual_attention

SPARSE_RECT = {**ALL_SPARSE, "block_size": 16}  # 16: the smallest block, 4 (flux) or 9 (wan21) blocks a side
SPARSER_RECT = {**SPARSE_RECT, "first_frame": False, "neighbors": False, "drop_rate": 0.75}
SMALL_CHUNKS = {**ALL_SPARSE, "chunk_1d": 1, "chunk_2d": [2, 2], "chunk_3d": [3, 2, 2]}  # 9 / 4 / 12 chunks on 9x4x4
ROWS = {
    "sd15": [("dense", {})]
    + [("agent", {"ratio": r, "agents": a}) for r in (0.2, 0.4, 0.6) for a in (True, False)]
    + [("agent", {"agents": False, "early_sx": 2, "early_sy": 2, "ratio": 0.5})],  # tomesd's recipe
    "flux": [("dense", {}), ("rectified_probe", {}), ("rectified_probe", SPARSE_RECT),
             ("rectified_probe", {**SPARSER_RECT, "drop_rate": 0.5}),
             ("rectified_probe", {**SPARSER_RECT, "p_remain": 0.1}), ("rectified_probe", SPARSER_RECT),
             ("agent", {"dit": True, "dit_agent_grid": 4}), ("agent", {"dit": True, "dit_agent_grid": 2})],
    "wan21": [("dense", {}), ("vmoba_probe", {}), ("vmoba_probe", {**SMALL_CHUNKS, "topk_ratio": 0.5}),
              ("vmoba_probe", SMALL_CHUNKS),
              ("vmoba_probe", {**SMALL_CHUNKS, "setting": "training"}),
              ("rectified_probe", {}), ("rectified_probe", SPARSE_RECT),
              ("rectified_probe", {**SPARSER_RECT, "p_remain": 0.1}), ("rectified_probe", SPARSER_RECT),
              ("agent", {"dit": True, "dit_agent_grid": 2})],
}


@register
class RectifiedProbe(RectifiedSpaAttn):
    """``rectified`` that also records each sparse call's exact-pair share (same output)."""

    name = "rectified_probe"
    summary = "benchmark probe: rectified, recording the density of each call"

    def __init__(self, config=None):
        super().__init__(config)
        self.densities: list[float] = []

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        out, density = rectified_visual_attention(q, k, v, extra_k, extra_v, scale, config=config, layout=layout,
                                                  layer_index=site.layer or 0, return_density=True)
        self.densities.append(density)
        return out


@register
class VMoBAProbe(VMoBA):
    """``vmoba`` that also records each sparse call's attended-pair share (same output)."""

    name = "vmoba_probe"
    summary = "benchmark probe: vmoba, recording the density of each call"

    def __init__(self, config=None):
        super().__init__(config)
        self.densities: list[float] = []

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        out, density = vmoba_visual_attention(q, k, v, extra_k, extra_v, scale, config=config, layout=layout,
                                              layer_index=site.layer or 0, return_density=True)
        self.densities.append(density)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="prompts x seeds per model (default 24)")
    ap.add_argument("--kinds", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", type=Path, default=RESULTS / "efficacy-dynamic.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    results = {"n": a.n, "density": "mean over the run's sparse calls of the share of visual (query, key) pairs "
                                    "computed exactly (None: no sparse call, or not a block method)",
               "models": {}}
    if a.out.exists():  # keep the kinds not re-run
        results["models"] = json.loads(a.out.read_text()).get("models", {})
    for kind in a.kinds:
        pipe = shapes_pipeline(kind)
        rows = sparse_rows(pipe, kind, a.n, ROWS[kind], density_of=_probe_density)
        for row in rows:
            row["method"] = row["method"].removesuffix("_probe")
        results["models"][kind] = rows
        print(json.dumps({kind: rows}, indent=1, default=str), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {a.out}")


def _probe_density(handle) -> float | None:
    densities = getattr(handle.method, "densities", None)
    return round(sum(densities) / len(densities), 4) if densities else None


if __name__ == "__main__":
    main()
