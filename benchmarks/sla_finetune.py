"""Does ``attnproc finetune`` make SLA faithful? The shapes-world video model (``shapes:wan21``), SLA at topk 0.1
(90 % of the key blocks skipped; automatic 15-token blocks for its 144-token videos), before and after a short
CPU fine-tune distilled from the dense model.

Measured against the dense pipeline on held-out captions and seeds (not the fine-tune's): PSNR and SSIM of the
uint8 videos, the shapes detector's verdicts (rates and per-video agreement with dense). Curves: the training
loss and, every ``--eval-every`` steps, the denoiser's relative error against dense on held-out noisy latents.

    nice -n 10 python benchmarks/sla_finetune.py --train method --steps 200   # -> benchmarks/results/sla-finetune-*.json
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attnproc
from attnproc.pipelines.shapes_models import eval_prompts, generate, quality, shapes_pipeline
from attnproc.sparse.sla import SLA, save_sla_weights
from attnproc.workflows.fidelity import psnr, ssim
from attnproc.workflows.finetune import finetune, parse_finetune_config, record_inputs, sample_time, _timestep

RESULTS = Path(__file__).resolve().parent / "results"
KIND = "wan21"
TOPK = 0.1
TRAIN_START = 1_000_000_000  # caption seeds of the fine-tune data (eval_prompts' held-out ones start at 2e9)


def u8(samples) -> list[np.ndarray]:
    return [np.clip(np.round(np.asarray(s) * 255), 0, 255).astype(np.uint8) for s in samples]


def video_row(samples, dense, prompts, dense_q) -> dict:
    """Fidelity of ``samples`` against the dense videos: PSNR, SSIM, detector rates and agreement."""
    q = quality(prompts, samples)
    keys = ("colour", "kind", "count", "motion")
    a, b = u8(samples), u8(dense)
    agree = [all(v[k] == r[k] for k in keys) for v, r in zip(q["verdicts"], dense_q["verdicts"])]
    return dict(psnr_db=round(float(np.mean([min(psnr(x, y), 99.0) for x, y in zip(a, b)])), 3),
                ssim=round(float(np.mean([ssim(x, y) for x, y in zip(a, b)])), 4),
                detector={k: q[k] for k in keys}, agreement_with_dense=round(float(np.mean(agree)), 3))


def heldout_probe(pipe, prompts, seed, n_t=6):
    """Noisy latents from held-out dense generations at ``n_t`` fixed times, with the dense outputs."""
    cfg = parse_finetune_config(dict(pipeline=f"shapes:{KIND}", method="sla", output="unused", prompt=prompts,
                                     data_steps=20, seed=seed))
    x0, rest = record_inputs(pipe, cfg)
    like = rest.pop("timestep_like")
    gen = torch.Generator().manual_seed(seed)
    probes = []
    for _ in range(n_t):
        t = sample_time(gen, 1, cfg)
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        xt = (1 - t.float()) * x0 + t.float() * eps
        ts = _timestep(t, like)
        with torch.no_grad():
            target = pipe.transformer(hidden_states=xt, timestep=ts, return_dict=False, **rest)[0]
        probes.append((xt, ts, target))
    return probes, rest


def probe_error(model, probes, rest) -> float:
    """Mean relative squared error ``|student - dense|^2 / |dense|^2`` over the probes."""
    errs = []
    with torch.no_grad():
        for xt, ts, target in probes:
            out = model(hidden_states=xt, timestep=ts, return_dict=False, **rest)[0]
            errs.append(float(((out - target) ** 2).mean() / (target ** 2).mean()))
    return float(np.mean(errs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="method", choices=("method", "full"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lr = args.lr or (1e-2 if args.train == "method" else 1e-4)
    out_path = RESULTS / f"sla-finetune-{KIND}-{args.train}.json"
    pipe = shapes_pipeline(KIND)
    prompts, seeds = eval_prompts(KIND, args.n_eval), list(range(args.n_eval))
    train_prompts = eval_prompts(KIND, args.n_train, start=TRAIN_START)
    t0 = time.perf_counter()
    dense = generate(pipe, KIND, prompts, seeds)
    dense_q = quality(prompts, dense)
    probes, rest = heldout_probe(pipe, eval_prompts(KIND, 4, start=2_000_000_100), seed=11)
    h = attnproc.apply(pipe, "sla", topk=TOPK)
    before = video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q)
    curve = [(0, probe_error(pipe.transformer, probes, rest))]
    h.remove()
    print("before", before, curve, flush=True)
    dense_row = dict(detector={k: dense_q[k] for k in ("colour", "kind", "count", "motion")})

    student = pipe if args.train == "method" else copy.deepcopy(pipe)  # full fine-tuning changes the weights
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_finetune_config(dict(
            pipeline=f"shapes:{KIND}", method="sla", options=dict(topk=TOPK), output=tmp, train=args.train,
            steps=args.steps, lr=lr, checkpoint_every=args.steps, prompt=train_prompts, data_steps=20, seed=0))

        def every(step, loss):
            if step % args.eval_every == 0 or step == args.steps:
                student.transformer.eval()
                curve.append((step, probe_error(student.transformer, probes, rest)))
                student.transformer.train()
                print(step, round(loss, 6), curve[-1], flush=True)

        t1 = time.perf_counter()
        result = finetune(cfg, pipe=student, callback=every, progress=False)
        train_seconds = time.perf_counter() - t1
        weights = Path(tmp) / "sla.safetensors"
        if args.train == "method":
            weights = result.weights  # already SLA's projection file
        else:  # the projections out of the full state, in the file apply(weights=) loads
            from safetensors.torch import load_file

            full = load_file(result.weights)
            projs = {f"transformer.{k.split('.attnproc.sla.')[0]}": (full[k], full[k.replace('.weight', '.bias')])
                     for k in full if k.endswith(".attnproc.sla.weight")}
            save_sla_weights(weights, projs, variant="main", model=SLA.model_id(student))
        student.transformer.eval()
        h = attnproc.apply(student, "sla", topk=TOPK, weights=str(weights))
        after = video_row(generate(student, KIND, prompts, seeds), dense, prompts, dense_q)
        h.remove()
    print("after", after, flush=True)
    losses = result.losses
    k = max(1, len(losses) // 20)
    row = dict(dense=dense_row, before=before, after=after,
               heldout_rel_error_curve=[(s, round(e, 6)) for s, e in curve],
               loss_curve=[(min(i + k, len(losses)), round(float(np.mean(losses[i:i + k])), 8))
                           for i in range(0, len(losses), k)],
               train_seconds=round(train_seconds, 1), total_seconds=round(time.perf_counter() - t0, 1))
    meta = dict(pipeline=f"shapes:{KIND} (17 x 32 x 32 video, 9 x 4 x 4 = 144 tokens, 3 layers, 2 heads, D=32)",
                method="sla", options=dict(topk=TOPK, variant="main", block_size="auto (15 tokens: 10 key blocks, "
                                           "1 kept per query block)"),
                train=args.train, steps=args.steps, lr=lr, batch=f"{args.n_train} latents from dense generations "
                "of held-apart captions (seeds from 1e9), 20 steps, CFG 3", time_sampling="lognormal (1.5, 1.6)",
                eval=f"{args.n_eval} held-out captions (eval_prompts) x seeds 0..{args.n_eval - 1}, 20 steps, CFG 3",
                probe="relative squared error of the denoiser vs dense on 4 other held-out captions x 6 noise levels",
                threads=torch.get_num_threads(), torch=torch.__version__)
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(dict(meta=meta, result=row), indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
