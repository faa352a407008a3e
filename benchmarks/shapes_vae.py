"""How much of the shapes world a video VAE keeps: encode + decode held-out clips, judge them by the detector.

The VAE caps the video model: what it cannot reconstruct (a colour, a motion) the denoiser cannot draw.
Clips are dataset samples of seeds ≥ 3·10⁹ (never trained on), 17 frames at 32², decoded from the
posterior mode; rates as in ``shapes_quality.py`` (the caption is the prompt).

    python benchmarks/shapes_vae.py [--vae FOLDER] [--n 64]   # -> benchmarks/results/shapes-vae.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from attnproc.pipelines.shapes import batch
from attnproc.pipelines.shapes_models import quality, shapes_model_dir
from attnproc.pipelines.shapes_train import SPECS

RESULTS = Path(__file__).resolve().parent / "results"


def reconstruct(vae, clips: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """[B, 3, F, H, W] in [-1, 1] → decoded uint8 [B, F, H, W, 3]."""
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(clips[i:i + chunk]).latent_dist.mode()).sample
                         for i in range(0, len(clips), chunk)])
    return ((rec.clamp(-1, 1).permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def main() -> None:
    from diffusers import AutoencoderKLWan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", type=Path, default=None, help="a diffusers AutoencoderKLWan folder (default: shipped wan21)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "shapes-vae.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = a.vae or shapes_model_dir("wan21") / "vae"
    vae = AutoencoderKLWan.from_pretrained(folder, dtype=torch.float32).eval()
    spec = SPECS["wan21"]
    pix, captions = batch(np.arange(a.n) + 3_000_000_000, spec.size, spec.frames, spec.max_shapes)
    rec = reconstruct(vae, torch.from_numpy(pix).permute(0, 2, 1, 3, 4).contiguous())
    q = quality(captions, list(rec))
    res = {"vae": str(a.vae) if a.vae else "shipped wan21", **{k: v for k, v in q.items() if k != "verdicts"}}
    print(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
