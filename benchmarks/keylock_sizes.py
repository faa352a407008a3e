"""Concept file sizes (key-locking / Perfusion) for real model architectures, from their shapes alone.

The UNets are built on the meta device (no weights, no download): a concept for each holds the token embedding,
``i*`` and ``o*_K``/``o*_V`` for every cross-attention module; it is written with :func:`save_concept` and the
file size measured. SDXL's row is what a concept would hold with both text encoders' embeddings (2 × token
embedding 768 + 1280; i* of the concatenated 2048-wide encoding), the layout `attnproc.steer.keylock` writes for SDXL.

    python benchmarks/keylock_sizes.py        # -> benchmarks/results/keylock-sizes.json
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from attnproc.pipelines.concepts import Concept, cross_attention_modules, save_concept

RESULTS = Path(__file__).resolve().parent / "results"

ARCHS = {
    "sd15": (dict(cross_attention_dim=768), 768, 768),
    "sd21": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
             1024, 1024),
    "sdxl": (dict(block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), 768 + 1280, 2048),
}


def concept_for(unet, embedding: int, width: int) -> Concept:
    mods = cross_attention_modules(unet)
    return Concept(token="<concept>", superclass="teddy", embedding=torch.zeros(embedding), i_star=torch.zeros(width),
                   keys={n: torch.zeros(m.to_k.out_features) for n, m in mods},
                   values={n: torch.zeros(m.to_v.out_features) for n, m in mods},
                   model="0" * 16, text_encoder="0" * 16)


def main() -> None:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, embedding, width) in ARCHS.items():
            with init_empty_weights():
                unet = UNet2DConditionModel(**config)
            c = concept_for(unet, embedding, width)
            path = save_concept(c, Path(tmp) / f"{name}.safetensors")
            floats = c.embedding.numel() + c.i_star.numel() + sum(t.numel() for t in c.keys.values()) * 2
            rows[name] = {"cross_attention_modules": len(c.keys),
                          "sum_d_out": sum(t.numel() for t in c.values.values()), "floats": floats,
                          "bytes": path.stat().st_size, "kib": round(path.stat().st_size / 1024, 1)}
            print(name, rows[name])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keylock-sizes.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
