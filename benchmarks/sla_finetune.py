"""Does ``attnproc finetune`` make a sparse method faithful? The shapes-world video model (``shapes:wan21``),
SLA at topk 0.1 (90 % of the key blocks skipped; automatic 15-token blocks for its 144-token videos unless
``--options`` sets them), VMoBA at a sparse setting, or Radial / GNA all-sparse (LoRA, as the Radial paper
fine-tunes), before and after a short CPU fine-tune distilled from the dense model.

The recipe matches what sampling uses (``data: trajectory``): the dense sampler's own states at its own
timesteps (shift 2), both halves of classifier-free guidance, and the loss on the guided prediction
(``guidance_scale`` 3, the model's sampling setting). Measured against the dense pipeline on held-out captions
and seeds: PSNR and SSIM of the uint8 videos and the detector's per-video agreement with dense, at a few
checkpoints, plus the denoiser's relative error of the guided prediction on the dense evaluation trajectories
(what each sampler step gets wrong, teacher-forced).

    nice -n 10 python benchmarks/sla_finetune.py --method sla --train full --steps 400
    nice -n 10 python benchmarks/sla_finetune.py --method vmoba --train lora --steps 400
    # -> benchmarks/results/finetune-wan21-<method>-<train>.json
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
from attnproc.workflows.finetune import finetune, parse_finetune_config, record_calls, sampler_steps
from attnproc.workflows.rollout import guided

RESULTS = Path(__file__).resolve().parent / "results"
KIND = "wan21"
GUIDANCE = 3.0  # shapes_call_kwargs("wan21"): the scale the model samples with
TRAIN_START = 1_000_000_000  # caption seeds of the fine-tune data (eval_prompts' held-out ones start at 2e9)
OPTIONS = {"sla": dict(topk=0.1),
           "vmoba": dict(setting="training", dense_first_steps=0),
           # the all-sparse settings of docs/shapes.md's efficacy table (density 0.21 and 0.19 on wan21)
           "radial": dict(dense_first_steps=0, dense_first_layers=0, block_size=16),
           "gna": dict(dense_first_steps=0, dense_first_layers=0, block_target=16, kernel_size=3)}
KEYS = ("colour", "kind", "count", "motion")
WARMUP = dict(dense_first_steps=0.25)  # VMoBA's paper schedule: the first quarter of the steps dense


def u8(samples) -> list[np.ndarray]:
    return [np.clip(np.round(np.asarray(s) * 255), 0, 255).astype(np.uint8) for s in samples]


def video_row(samples, dense, prompts, dense_q) -> dict:
    """Fidelity of ``samples`` against the dense videos: PSNR, SSIM, detector agreement (all four verdicts, and
    each apart: the dense model's kind verdicts are right on only 20 % of its videos, so they flip at random)."""
    q = quality(prompts, samples)
    same = [{k: v[k] == r[k] for k in KEYS} for v, r in zip(q["verdicts"], dense_q["verdicts"])]
    agree = [all(s.values()) for s in same]
    per_key = {k: round(float(np.mean([s[k] for s in same])), 3) for k in KEYS}
    a, b = u8(samples), u8(dense)
    return dict(psnr_db=round(float(np.mean([min(psnr(x, y), 99.0) for x, y in zip(a, b)])), 3),
                ssim=round(float(np.mean([ssim(x, y) for x, y in zip(a, b)])), 4),
                agreement_with_dense=round(float(np.mean(agree)), 3), agreement_per_attribute=per_key)


def guided_prediction(model, pair):
    with torch.no_grad():
        return guided([model(**c, return_dict=False)[0] for c in pair], GUIDANCE)[0]


def guided_error(model, probes, targets) -> float:
    """Mean relative squared error of the guided prediction against dense over the probe steps."""
    return float(np.mean([float(((guided_prediction(model, p) - t) ** 2).mean() / (t ** 2).mean())
                          for p, t in zip(probes, targets)]))


def rollout(pipe, prompts, seeds):
    """One batched generation: the latent after every sampler step and the denoiser's inputs at every call."""
    from attnproc.pipelines.shapes_models import shapes_call_kwargs

    latents, calls = [], []

    def keep(_pipe, i, t, kw):
        latents.append(kw["latents"].detach().clone())
        return kw

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in dict(kwargs, **({"hidden_states": args[0]} if args else {})).items()
                      if k != "return_dict"})

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**shapes_call_kwargs(KIND, list(prompts), generator=[torch.Generator().manual_seed(s) for s in seeds],
                                  output_type="latent", callback_on_step_end=keep))
    finally:
        h.remove()
    return latents, sampler_steps(calls, GUIDANCE)


def drift(pipe, teacher, dense_latents, dense_steps, prompts, seeds, per_call: bool = True) -> dict:
    """Where the sparse video leaves the dense one, per sampler step: the latent's relative distance to the dense
    latent after the step, and the guided prediction's relative error against the dense teacher at the dense
    sampler's states (teacher-forced) and at the student's own states (what it meets when it samples).
    ``per_call=False``: the latents only (a schedule with dense steps needs the pipeline's step index)."""
    latents, own_steps = rollout(pipe, prompts, seeds)

    def rel(a, b):
        return round(float(((a - b) ** 2).sum() / (b ** 2).sum()), 4)

    row = dict(latent_rel_error=[rel(s, d) for s, d in zip(latents, dense_latents)])
    if not per_call:
        return row
    return dict(row,
                guided_error_dense_states=[rel(guided_prediction(pipe.transformer, p), guided_prediction(teacher, p)) for p in dense_steps],
                guided_error_own_states=[rel(guided_prediction(pipe.transformer, p), guided_prediction(teacher, p)) for p in own_steps])


def sensitivity(pipe, prompts, seeds, model) -> None:
    """Is the dense sampler chaotic? Add Gaussian noise of relative size ``eps`` (squared, per batch) to the
    latent after sampler step k, sample on dense, and measure how far the final latent lands from the
    unperturbed one: growth means small per-step errors get amplified, shrinkage means they do not. Then the
    same for the error SLA (topk 0.1, untrained) itself makes: SLA on the first steps only, dense after them."""
    from attnproc.pipelines.shapes_models import shapes_call_kwargs

    def final(k=None, eps=0.0):
        def kick(_pipe, i, t, kw):
            if i == k:
                x = kw["latents"]
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
                kw["latents"] = x + noise * (eps * (x ** 2).mean() / (noise ** 2).mean()).sqrt()
            return kw

        return pipe(**shapes_call_kwargs(KIND, list(prompts), output_type="latent", callback_on_step_end=kick,
                                         generator=[torch.Generator().manual_seed(s) for s in seeds])).frames

    ref = final()
    rows = [dict(after_step=k + 1, perturbation_rel=eps,
                 final_latent_rel_error=round(float(((final(k, eps) - ref) ** 2).sum() / (ref ** 2).sum()), 5))
            for k in (0, 2, 4, 9, 14) for eps in (0.001, 0.01, 0.03)]
    dense_latents, _ = rollout(pipe, prompts, seeds)
    for last in (0.75, 0.5, 0.25):  # SLA on the first 5, 10, 15 of 20 steps
        h = attnproc.apply(pipe, "sla", topk=0.1, dense_last_steps=last)
        err = drift(pipe, None, dense_latents, None, prompts, seeds, per_call=False)["latent_rel_error"]
        h.remove()
        k = round(20 * (1 - last))
        rows.append(dict(sla_first_steps=k, latent_rel_error_after_them=err[k - 1], final_latent_rel_error=err[-1]))
    meta = dict(pipeline=f"shapes:{KIND}", model=model or "packaged", eval=f"{len(prompts)} held-out captions x seeds, "
                "dense, 20 steps, CFG 3", rel="|x - x_ref|^2 / |x_ref|^2 over the batch", torch=torch.__version__)
    (RESULTS / f"finetune-{KIND}-dense-sensitivity.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(json.dumps(rows))


def load_model(folder: str | None):
    """The packaged shapes-world Wan model, or another trained one (``--model FOLDER``), fp32 on CPU."""
    if folder is None:
        return shapes_pipeline(KIND)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reapply(pipe, method, options, result, train, folder):
    """The fine-tuned student under other options, after ``finetune`` removed its handle: LoRA adapters and
    full weights stay in the denoiser; SLA's projections come back through ``apply(weights=)``."""
    if method != "sla" or train == "lora":
        return attnproc.apply(pipe, method, **options)
    weights = result.weights
    if train == "full":  # the projections out of the full state, in the file apply(weights=) loads
        from safetensors.torch import load_file

        full = load_file(result.weights)
        projs = {f"transformer.{k.split('.attnproc.sla.')[0]}": (full[k], full[k.replace('.weight', '.bias')])
                 for k in full if k.endswith(".attnproc.sla.weight")}
        weights = save_sla_weights(Path(folder) / "sla.safetensors", projs, variant="main", model=SLA.model_id(pipe),
                                   trained_with=attnproc.create("sla", **options).trained_with(pipe))
    return attnproc.apply(pipe, "sla", weights=str(weights), **options)


def sweep(pipe, prompts, seeds, dense, dense_q, probes, targets, floor, settings: list[dict], name: str) -> None:
    """Untrained SLA (zero projections: block-sparse attention) at each of ``settings``."""
    rows = []
    for options in settings:
        h = attnproc.apply(pipe, "sla", **options)
        rows.append(dict(options, guided_rel_error=round(guided_error(pipe.transformer, probes, targets), 4),
                         **video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q)))
        h.remove()
        print(rows[-1], flush=True)
    meta = dict(pipeline=f"shapes:{KIND}", method="sla (zero projections = block-sparse)", eval=f"{len(prompts)} "
                "held-out captions x seeds, 20 steps, CFG 3, against dense", torch=torch.__version__)
    (RESULTS / f"finetune-{KIND}-sla-{name}-sweep.json").write_text(
        json.dumps(dict(meta=meta, result=dict(dense_other_seed=floor, rows=rows)), indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sla", choices=tuple(OPTIONS))
    ap.add_argument("--train", default="full", choices=("method", "lora", "full"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--eval-at", default="50,100,200,400")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-offset", type=int, default=0, help="another held-out set: captions and seeds shifted")
    ap.add_argument("--model", default=None, help="a shapes-world Wan folder (default: the packaged wan21)")
    ap.add_argument("--data", default="trajectory", choices=("trajectory", "on_policy"))
    ap.add_argument("--refresh-every", type=int, default=25, help="data on_policy: steps between regenerations")
    ap.add_argument("--step-weights", default=None, help="comma list, one per sampler step; 'early': "
                    "(20 - i)^2, the high-noise steps drawn most often; 'first': always step 0 (with --rollout: "
                    "the window of the first steps)")
    ap.add_argument("--rollout", type=int, default=None, help="rollout_steps: the loss after this many sampler "
                    "steps of the student against the dense teacher from the same state (end to end)")
    ap.add_argument("--step-loss-weight", type=float, default=0.0, help="with --rollout: plus this times the "
                    "per-step loss at the window's start")
    ap.add_argument("--options", default=None, help="JSON merged into the method's options, e.g. VMoBA's small "
                    "chunks")
    ap.add_argument("--cooldown", type=int, default=0, help="the rate falls linearly to 0 over the last N steps")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--sensitivity", action="store_true", help="no training: how the dense sampler carries a "
                    "small latent perturbation to the end")
    ap.add_argument("--sweep", default=None, help="untrained SLA at these topk (comma list): how the per-step "
                    "guided error maps to video fidelity; no training")
    ap.add_argument("--sweep-blocks", default=None, help="untrained SLA at topk 0.1 with these block sizes (comma "
                    "list, block_q = block_k): how the block map's granularity sets the error; no training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lr = args.lr or {"method": 1e-2, "lora": 1e-3, "full": 4e-4}[args.train]
    eval_at = {int(s) for s in args.eval_at.split(",")} | {args.steps}
    options = dict(OPTIONS[args.method], **(json.loads(args.options) if args.options else {}))
    step_weights = ([(20 - i) ** 2 for i in range(20)] if args.step_weights == "early"
                    else [1.0] + [0.0] * 19 if args.step_weights == "first"
                    else [float(w) for w in args.step_weights.split(",")] if args.step_weights else None)
    pipe = load_model(args.model)
    prompts = eval_prompts(KIND, args.n_eval, start=2_000_000_000 + args.eval_offset)
    seeds = list(range(args.eval_offset, args.eval_offset + args.n_eval))
    t0 = time.perf_counter()
    if args.sensitivity:
        return sensitivity(pipe, prompts, seeds, args.model)
    dense = generate(pipe, KIND, prompts, seeds)
    dense_q = quality(prompts, dense)
    floor = video_row(generate(pipe, KIND, prompts, [s + 500 for s in seeds]), dense, prompts, dense_q)
    probe_cfg = parse_finetune_config(dict(pipeline=f"shapes:{KIND}", method=args.method, output="unused",
                                           prompt=prompts, data_steps=20, seed=0, data="trajectory",
                                           guidance_scale=GUIDANCE))
    probes = sampler_steps(record_calls(pipe, probe_cfg), GUIDANCE)  # eval captions; seed 0 batch noise
    targets = [guided_prediction(pipe.transformer, p) for p in probes]
    teacher = copy.deepcopy(pipe.transformer).eval()
    dense_latents, dense_steps = rollout(pipe, prompts, seeds)
    if args.sweep:
        return sweep(pipe, prompts, seeds, dense, dense_q, probes, targets, floor,
                     [dict(topk=float(t)) for t in args.sweep.split(",")], "topk")
    if args.sweep_blocks:
        return sweep(pipe, prompts, seeds, dense, dense_q, probes, targets, floor,
                     [dict(topk=0.1, block_q=int(b), block_k=int(b)) for b in args.sweep_blocks.split(",")], "block")
    h = attnproc.apply(pipe, args.method, **options)
    curve = [dict(step=0, guided_rel_error=round(guided_error(pipe.transformer, probes, targets), 4),
                  **video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q))]
    drifts = dict(before=drift(pipe, teacher, dense_latents, dense_steps, prompts, seeds))
    h.remove()
    h = attnproc.apply(pipe, args.method, **dict(options, **WARMUP))
    warm = dict(before=video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q))
    h.remove()
    print("before", curve[0], warm, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_finetune_config(dict(
            pipeline=f"shapes:{KIND}", method=args.method, options=options, output=tmp, train=args.train,
            steps=args.steps, lr=lr, weight_decay=0.0, checkpoint_every=args.steps,
            prompt=eval_prompts(KIND, args.n_train, start=TRAIN_START), data_steps=20, seed=0,
            data=args.data, refresh_every=args.refresh_every, guidance_scale=GUIDANCE, lora_rank=8,
            step_weights=step_weights, rollout_steps=args.rollout, step_loss_weight=args.step_loss_weight,
            cooldown=args.cooldown))

        def every(step, loss):
            if step in eval_at:
                pipe.transformer.eval()
                curve.append(dict(step=step, guided_rel_error=round(guided_error(pipe.transformer, probes, targets), 4),
                                  **video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q)))
                pipe.transformer.train()
                print(curve[-1], round(time.perf_counter() - t0), flush=True)

        t1 = time.perf_counter()
        result = finetune(cfg, pipe=pipe, callback=every, progress=False)
        train_seconds = time.perf_counter() - t1
        pipe.transformer.eval()
        for name, extra in (("after_reloaded", {}), ("after", WARMUP)):  # reloaded: must equal the curve's end
            h = reapply(pipe, args.method, dict(options, **extra), result, args.train, tmp)
            warm[name] = video_row(generate(pipe, KIND, prompts, seeds), dense, prompts, dense_q)
            if not extra:
                drifts["after"] = drift(pipe, teacher, dense_latents, dense_steps, prompts, seeds)
            h.remove()
        print(warm, flush=True)
    losses = result.losses
    k = max(1, len(losses) // 20)
    row = dict(dense_other_seed=floor, curve=curve, with_dense_warmup=dict(options=WARMUP, **warm), drift=drifts,
               loss_curve=[(min(i + k, len(losses)), round(float(np.mean(losses[i:i + k])), 6))
                           for i in range(0, len(losses), k)],
               train_seconds=round(train_seconds, 1), total_seconds=round(time.perf_counter() - t0, 1))
    meta = dict(pipeline=f"shapes:{KIND} (17 x 32 x 32 video, 9 x 4 x 4 = 144 tokens, 3 layers, 2 heads, D=32)",
                method=args.method, options=options, train=args.train, steps=args.steps, lr=lr,
                model=args.model or "packaged", step_weights=step_weights, rollout_steps=args.rollout, cooldown=args.cooldown,
                step_loss_weight=args.step_loss_weight,
                data=f"data: {args.data}, guidance_scale {GUIDANCE}: the "
                     f"{'dense' if args.data == 'trajectory' else 'student' + chr(39) + 's own'} sampler's calls "
                     f"(20 steps, shift 2, CFG pairs"
                     f"{', regenerated every %d steps' % args.refresh_every if args.data == 'on_policy' else ''}) "
                     f"on {args.n_train} held-apart captions (seeds from 1e9), "
                     + (f"loss after a window of {args.rollout} sampler steps rolled out from a drawn step "
                        f"(rollout_steps; + {args.step_loss_weight} x per-step loss)" if args.rollout
                        else "one sampler step per optimizer step"),
                drift="per sampler step: latent_rel_error = |x_student - x_dense|^2 / |x_dense|^2 after the step "
                      "(same seed and caption); guided error at the dense sampler's states and at the student's "
                      "own states",
                eval=f"{args.n_eval} held-out captions (eval_prompts from 2e9 + {args.eval_offset}) x seeds "
                     f"{seeds[0]}..{seeds[-1]}, 20 steps, CFG 3; "
                     f"dense_other_seed: dense with seeds +500 against dense (unrelated videos)",
                guided_rel_error="|guided student - guided dense|^2 / |guided dense|^2 on the dense sampler's 20 "
                                 "steps of the eval captions (teacher-forced)",
                threads=torch.get_num_threads(), torch=torch.__version__)
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"-eval{args.eval_offset}" if args.eval_offset else "") + (
        "-on-policy" if args.data == "on_policy" else "") + (f"-rollout{args.rollout}" if args.rollout else "") + args.tag
    out = RESULTS / f"finetune-{KIND}-{args.method}-{args.train}{suffix}.json"
    out.write_text(json.dumps(dict(meta=meta, result=row), indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
