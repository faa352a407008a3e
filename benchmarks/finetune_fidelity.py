"""Does ``attnproc finetune`` recover fidelity lost to sparsity? Tiny Wan 2.1 (random weights), Radial with small
blocks (so the mask is really sparse), LoRA rank 8 distilled from the dense teacher.

Measured against the dense pipeline's own output, before and after fine-tuning, on a generation with a seed and
prompt not used for training (the held-out check), plus the distillation loss curve.

    nice -n 10 python benchmarks/finetune_fidelity.py          # -> benchmarks/results/finetune-fidelity.json
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import attnproc
import attnproc.sparse.radial  # noqa: F401
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.workflows.finetune import finetune, parse_finetune_config

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = dict(block_size=16, decay=0.2, dense_first_steps=0, dense_first_layers=0)
HELD_OUT = dict(prompt="a blue cube slides left", generator_seed=7)


def generate(pipe) -> torch.Tensor:
    kw = tiny_call_kwargs("wan21", prompt=HELD_OUT["prompt"], num_inference_steps=6, output_type="pt")
    kw["generator"] = torch.Generator().manual_seed(HELD_OUT["generator_seed"])
    with torch.no_grad():
        return pipe(**kw).frames.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def with_method(pipe) -> torch.Tensor:
    handle = attnproc.apply(pipe, "radial", **OPTIONS)
    try:
        return generate(pipe)
    finally:
        handle.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    pipe = tiny_pipeline("wan21", seed=0)
    dense = generate(pipe)
    before = with_method(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_finetune_config(dict(pipeline="tiny:wan21", method="radial", options=OPTIONS, output=tmp,
                                         train="lora", lora_rank=8, steps=args.steps, lr=2e-3,
                                         checkpoint_every=args.steps, data_steps=4, seed=0))
        t0 = time.perf_counter()
        result = finetune(cfg, pipe=pipe, progress=False)
        seconds = time.perf_counter() - t0
    after = with_method(pipe)  # the pipeline keeps the trained LoRA adapters
    losses = result.losses
    k = max(1, len(losses) // 10)
    row = dict(psnr_before=round(psnr(before, dense), 2), psnr_after=round(psnr(after, dense), 2),
               max_abs_before=round(float((before - dense).abs().max()), 4),
               max_abs_after=round(float((after - dense).abs().max()), 4),
               loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k,
               loss_curve=[round(sum(losses[i:i + k]) / len(losses[i:i + k]), 8) for i in range(0, len(losses), k)],
               train_seconds=round(seconds, 1), steps=args.steps)
    print(json.dumps(row, indent=1))
    meta = dict(pipeline="tiny:wan21 (random weights, 3x8x8 latent tokens)", method="radial", options=OPTIONS,
                train="lora rank 8 on to_q/to_k/to_v/to_out.0, lr 2e-3, lognormal t (1.5, 1.6)",
                held_out=HELD_OUT, threads=torch.get_num_threads(), torch=torch.__version__,
                note="PSNR of the radial pipeline's video against the dense pipeline's (same seed), frames in [0,1]")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "finetune-fidelity.json"
    out.write_text(json.dumps(dict(meta=meta, result=row), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
