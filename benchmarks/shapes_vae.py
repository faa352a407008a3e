"""How much of the shapes world a VAE keeps: encode + decode held-out samples, judge them by the detector.

The VAE caps its model: what it cannot reconstruct (a colour, a corner, a motion) the denoiser cannot draw.
Samples are dataset samples of seeds ≥ 3·10⁹ (never trained on) at the kind's size (wan21: 17 frames at 32²;
sd15, whose VAE flux shares: 64² images of 1–3 shapes), decoded from the posterior mode; rates as in
``shapes_quality.py`` (the caption is the prompt). Since the ground truth of every sample is known, it
also checks the detector on decoded images: ``kind_per_shape`` is the share of the samples' shapes whose
kind it reads right (sd15: what a softened but clear shape costs the measure of the image models).

    python benchmarks/shapes_vae.py [--kind wan21|sd15] [--vae FOLDER] [--n 64]
    # -> benchmarks/results/shapes-vae.json (wan21), shapes-vae-sd15.json (sd15)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from attnproc.pipelines.shapes import batch, render_sample
from attnproc.pipelines.shapes_detect import kinds_read_right
from attnproc.pipelines.shapes_models import quality, shapes_model_dir
from attnproc.pipelines.shapes_train import SPECS

RESULTS = Path(__file__).resolve().parent / "results"


def reconstruct(vae, x: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """Clips [B, 3, F, H, W] or images [B, 3, H, W] in [-1, 1] → decoded uint8 [B, (F,) H, W, 3]."""
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + chunk]).latent_dist.mode()).sample
                         for i in range(0, len(x), chunk)])
    rec = rec.clamp(-1, 1).movedim(1, -1).numpy()
    return ((rec + 1) * 127.5).round().astype(np.uint8)


def main() -> None:
    from diffusers import AutoencoderKL, AutoencoderKLWan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("wan21", "sd15"), default="wan21", help="whose VAE (flux shares sd15's)")
    ap.add_argument("--vae", type=Path, default=None, help="a diffusers VAE folder of that kind (default: shipped)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = a.vae or shapes_model_dir(a.kind) / "vae"
    cls = AutoencoderKLWan if a.kind == "wan21" else AutoencoderKL
    vae = cls.from_pretrained(folder, dtype=torch.float32).eval()
    spec = SPECS[a.kind]
    pix, captions = batch(np.arange(a.n) + 3_000_000_000, spec.size, spec.frames, spec.max_shapes)
    x = torch.from_numpy(pix)  # [B, F, 3, H, W]
    x = x.permute(0, 2, 1, 3, 4).contiguous() if a.kind == "wan21" else x[:, 0]
    rec = reconstruct(vae, x)
    q = quality(captions, list(rec))
    res = {"vae": str(a.vae) if a.vae else f"shipped {a.kind}", **{k: v for k, v in q.items() if k != "verdicts"}}
    if a.kind == "sd15":
        samples = [render_sample(int(s), spec.size, spec.frames, spec.max_shapes) for s in np.arange(a.n) + 3_000_000_000]
        right, total = kinds_read_right(rec, samples)
        res["kind_per_shape"] = right / total
    out = a.out or RESULTS / ("shapes-vae.json" if a.kind == "wan21" else f"shapes-vae-{a.kind}.json")
    print(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
