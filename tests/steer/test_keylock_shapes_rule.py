"""The keylock shapes benchmark's concept rule (benchmarks/keylock_shapes.py ``found``): a two-colour flag that
the shapes VAE has encoded and decoded must still count, its colour-swapped twin must not. The first rule wanted
the halves' boxes to touch without overlap; the VAE's colour bleed made every flag, even a perfectly drawn one,
count as absent (0/8), which read as "the concept is never learned"."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from attnproc.pipelines.shapes_models import shapes_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("keylock_shapes", ROOT / "benchmarks" / "keylock_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vae_round_tripped_flags_are_found_and_swapped_ones_are_not():
    from diffusers import AutoencoderKL

    ks = _bench()
    vae = AutoencoderKL.from_pretrained(shapes_model_dir("sd15"), subfolder="vae")
    rng = np.random.default_rng(3)
    for name in ("flag", "ball"):
        _, kind, colours, axis = ks.CONCEPTS[name]
        drawn = [ks.draw(kind, colours, axis, rng)[0] for _ in range(4)]
        swapped = [ks.draw(kind, colours[::-1], axis, rng)[0] for _ in range(4)]
        x = torch.from_numpy(np.stack(drawn + swapped)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            out = vae.decode(vae.encode(x).latent_dist.mean).sample
        decoded = list(((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
        assert [ks.appears(im, name) for im in decoded] == [True] * 4 + [False] * 4, name
        assert all(ks.appears(im / 255, name) for im in drawn) and not any(ks.appears(im / 255, name) for im in swapped)
    # one-colour concepts: a red square counts for <rsq>, a red circle does not
    assert ks.appears(ks.draw("square", ("red", "red"), None, rng)[0] / 255, "rsq")
    assert not ks.appears(ks.draw("circle", ("red", "red"), None, rng)[0] / 255, "rsq")
