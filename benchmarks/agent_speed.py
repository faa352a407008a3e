"""AgentSD self-attention (attn1) time against the stock dense attention at real UNet shapes, random weights.

Shapes (batch 2 = one classifier-free-guidance pair):
* SD 1.5 at 512^2: latent 64x64, full-resolution block: 4096 tokens, 320 channels, 8 heads of 40;
* SDXL at 1024^2: latent 128x128; SDXL has no attention at full resolution, its first transformer level is
  64x64: 4096 tokens, 640 channels, 10 heads of 64 (patched only with ``max_downsample=2``).

Per shape: the stock diffusers ``Attention`` (SDPA), AgentSD early steps (sx=sy=4, ratio 0.4, agent_ratio 0.95:
merge + agents), AgentSD late steps (sx=sy=2, agent_ratio 0.5: the gate is off, plain ToMe at ratio 0.4), and the
merge alone. Round-robin timing (the same load hits every variant), median and min/max over the repetitions.

    nice -n 10 python benchmarks/agent_speed.py            # -> benchmarks/results/agent-speed-cpu.json
    nice -n 10 python benchmarks/agent_speed.py --quick    # SD 1.5 only, fewer repetitions
    nice -n 10 python benchmarks/agent_speed.py --unet     # plus a whole SD 1.5 UNet step (minutes)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention

from attnproc.sparse.agent import AgentConfig, agent_self_attention, tome_merge

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = [  # name, latent (h, w), block grid (h, w), channels, heads
    ("SD 1.5 512^2, full-resolution block", (64, 64), (64, 64), 320, 8),
    ("SDXL 1024^2, first attention level (64x64)", (128, 128), (64, 64), 640, 10),
]


def round_robin(fns: dict, reps: int) -> dict:
    """Median and spread (min, max) in ms of each callable, timed in turn so that load affects all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: dict(median_ms=round(statistics.median(ts), 1), min_ms=round(min(ts), 1),
                       max_ms=round(max(ts), 1)) for name, ts in times.items()}


def bench_shape(name, latent, grid, channels, heads, reps, batch=2):
    torch.manual_seed(0)
    attn = Attention(channels, heads=heads, dim_head=channels // heads, bias=False).eval()
    h, w = grid
    block_input = torch.randn(batch, h * w, channels)
    hidden = torch.nn.functional.layer_norm(block_input, (channels,))
    cfg = AgentConfig(max_downsample=2)
    (_, early), (_, late) = cfg.plan(latent, h * w, 0, 50), cfg.plan(latent, h * w, 49, 50)

    def run(step):
        return lambda: agent_self_attention(attn, hidden, block_input, grid, step,
                                            generator=torch.Generator().manual_seed(0))

    def merge_only():
        tome_merge(block_input, hidden, grid, sx=early.sx, sy=early.sy, ratio=early.ratio,
                   agent_ratio=early.agent_ratio, generator=torch.Generator().manual_seed(0))

    merged, agents, _ = tome_merge(block_input, hidden, grid, sx=early.sx, sy=early.sy, ratio=early.ratio,
                                   agent_ratio=early.agent_ratio, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        timing = round_robin({"dense": lambda: attn(hidden), "agent_early": run(early), "tome_late": run(late),
                              "merge_only_early": merge_only}, reps)
    dense = timing["dense"]["median_ms"]
    for key in ("agent_early", "tome_late"):
        timing[key]["speedup_vs_dense"] = round(dense / timing[key]["median_ms"], 2)
    return dict(shape=name, batch=batch, tokens=h * w, channels=channels, heads=heads,
                merged_tokens=merged.shape[1], agents=agents.shape[1], early=vars(early), late=vars(late),
                timing=timing)


def bench_unet_step(reps):
    """One SD 1.5 UNet forward (random weights, the SD 1.5 config) at 512^2 with CFG batch 2 through the registered
    method (``attnproc.apply(unet, "agent")``): dense, AgentSD's early settings, and its late settings (given as
    the early ones, since a bare UNet call has no step); relative L2 of the noise prediction vs dense."""
    import attnproc
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    sample, ctx, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.tensor(500)
    late = dict(early_sx=2, early_sy=2, early_agent_ratio=0.5)
    outs, patched = {}, set()

    def variant(name, options):
        def fn():
            if options is not None:
                handle = attnproc.apply(unet, "agent", **options)
                inner = handle.method.module_output

                def counted(site):  # the attn1 modules the method actually computed
                    out = inner(site)
                    if out is not None:
                        patched.add(site.name)
                    return out
                handle.method.module_output = counted
            try:
                outs[name] = unet(sample, t, encoder_hidden_states=ctx).sample
            finally:
                attnproc.remove(unet)
        return fn

    with torch.no_grad():
        timing = round_robin({"dense": variant("dense", None), "agent_early": variant("agent_early", {}),
                              "tome_late": variant("tome_late", late)}, reps)
    dense = outs["dense"]
    for key in ("agent_early", "tome_late"):
        timing[key]["speedup_vs_dense"] = round(timing["dense"]["median_ms"] / timing[key]["median_ms"], 2)
        timing[key]["rel_l2_vs_dense"] = round(((outs[key] - dense).norm() / dense.norm()).item(), 4)
    blocks = sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    return dict(shape="SD 1.5 UNet step, 512^2 (latent 64x64), batch 2, random weights",
                transformer_blocks=blocks, patched_blocks=len(patched), timing=timing)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--unet", action="store_true", help="also time a whole SD 1.5 UNet step (minutes on a CPU)")
    ap.add_argument("--unet-only", action="store_true",
                    help="time only the UNet step; the layer rows of the previous full run are kept")
    args = ap.parse_args()
    args.unet = args.unet or args.unet_only
    shapes = [] if args.unet_only else SHAPES[:1] if args.quick else SHAPES
    reps = 3 if args.quick else 7
    rows = []
    for shape in shapes:
        row = bench_shape(*shape, reps=reps)
        rows.append(row)
        t = row["timing"]
        print(f"{row['shape']}: dense {t['dense']['median_ms']} ms, agent (early) {t['agent_early']['median_ms']} ms "
              f"({t['agent_early']['speedup_vs_dense']}x), ToMe (late) {t['tome_late']['median_ms']} ms "
              f"({t['tome_late']['speedup_vs_dense']}x), merge alone {t['merge_only_early']['median_ms']} ms",
              flush=True)
    unet = None
    if args.unet:
        unet = bench_unet_step(reps=3)
        t = unet["timing"]
        print(f"{unet['shape']}: dense {t['dense']['median_ms']} ms, agent (early) {t['agent_early']['median_ms']} ms "
              f"({t['agent_early']['speedup_vs_dense']}x), ToMe (late) {t['tome_late']['median_ms']} ms "
              f"({t['tome_late']['speedup_vs_dense']}x)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("agent-speed-cpu-quick.json" if args.quick else "agent-speed-cpu.json")
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, dtype="float32", reps=reps,
                note="CPU only (no GPU lent to this task), shared 2-core machine, run under nice; random weights")
    if args.unet_only and out.exists():
        previous = json.loads(out.read_text())
        meta, rows = previous["meta"], previous["rows"]
        meta["unet_step_note"] = f"UNet step re-run alone (--unet-only), {torch.get_num_threads()} threads"
    result = dict(meta=meta, rows=rows)
    if unet is not None:
        result["unet_step"] = unet
    elif out.exists():  # keep a previous --unet measurement
        previous = json.loads(out.read_text()).get("unet_step")
        if previous:
            result["unet_step"] = previous
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
