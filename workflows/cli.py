"""The ``attnproc`` command line: ``methods``, ``demo``, ``render``, ``bench``, ``ui``, ``export-comfy``."""
from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import sys
from pathlib import Path

import attnproc


def parse_option(text: str) -> tuple[str, object]:
    """``name=value`` with the value read as JSON when it parses (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options are name=value, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False}.get(raw, raw)
    return name.strip(), value


def _cmd_methods(args) -> int:
    infos = attnproc.methods()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return 0
    for info in infos:
        print(f"{info.name:12s} {info.summary}")
        for o in info.options:
            print(f"    {o.name} = {o.default!r}  ({o.describe_range()})  {o.help}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    pipeline = f"tiny:{args.family}" if args.family else args.pipeline
    report = run_demo(args.method, args.out, dict(args.option or []), pipeline=pipeline, seed=args.seed,
                      prompt=args.prompt, repeats=args.repeats, progress=not args.quiet)
    print(json.dumps({k: v for k, v in report.items() if k not in ("runs", "timing")}, indent=2, default=str))
    for name, timings in report["timing"].items():
        if isinstance(timings, dict) and "total_s" in timings:
            t, a = timings["total_s"], timings["attention_s"]
            print(f"{name}: total {t['median']:.3f}s (range {t['min']:.3f}-{t['max']:.3f}), attention "
                  f"{a['median']:.3f}s (range {a['min']:.3f}-{a['max']:.3f}), median of {timings['repeats']} warm "
                  f"runs -> {report['runs'][name]['output']}")
    if "verdict" in report["timing"]:
        print(report["timing"]["verdict"])
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _cmd_render(args) -> int:
    from .jobs import check_jobfile, load_jobfile
    from .render import render

    jobfile = load_jobfile(args.jobfile)
    if args.dry_run:
        check_jobfile(jobfile)  # method vs the pipeline's family, fields vs its call (render checks it too)
        for job in jobfile.jobs:
            print(json.dumps({"job": job.index, "hash": jobfile.hash_of(job), **jobfile.config_of(job)},
                             default=str))
        return 0
    summary = render(jobfile, args.out, compare=args.compare, repeats=args.repeats, progress=not args.quiet,
                     cp=args.cp)
    if "done" in summary:  # the main process prints the summary
        print(json.dumps(summary, indent=2))
    return 1 if summary.get("failed") else 0


def _cmd_finetune(args) -> int:
    from .cp import parse_cp
    from .finetune import finetune, load_finetune_config, summarize_losses

    cfg = load_finetune_config(args.config)
    if args.output:
        cfg.output = args.output
    if args.cp:
        cfg.context_parallel = str(parse_cp(args.cp))
    result = finetune(cfg, progress=not args.quiet)
    print(f"{summarize_losses(result.losses)}; weights: {result.weights}")
    return 0


def _cmd_train_concept(args) -> int:
    from .train_concept import load_concept_config, parse_concept_config, train_concept

    given = {k: v for k, v in vars(args).items() if k in _CONCEPT_FLAGS and v is not None}
    cfg = load_concept_config(args.config, **given) if args.config else parse_concept_config(given)
    result = train_concept(cfg, progress=not args.quiet)
    tail = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"concept {cfg.token!r}: {result.concept} ({result.steps} steps{tail})")
    return 0


def _cmd_keylock_covariance(args) -> int:
    from attnproc.pipelines import concepts as cc

    from .render import load_pipeline

    captions = [line.strip() for line in open(args.captions, encoding="utf-8") if line.strip()]
    pipe = load_pipeline(args.pipeline)
    c = cc.estimate_covariance(pipe, captions, ridge=args.ridge)
    fp = cc.text_fingerprint(pipe)
    path = cc.save_covariance(c, args.output, text_encoder=fp, captions=len(captions), ridge=args.ridge)
    print(f"covariance of {len(captions)} captions ({c.shape[0]}x{c.shape[0]}, text encoder {fp}): {path}")
    return 0


_CONCEPT_FLAGS = ("pipeline", "images", "masks", "captions", "token", "superclass", "covariance", "output", "steps",
                  "batch_size", "grad_accum", "lr_embedding", "lr_values", "seed", "checkpoint_every", "mixed_precision")


def _cmd_ui(args) -> int:
    from attnproc.ui.app import launch

    launch(host=args.host, port=args.port, pipelines=args.pipeline or None, share=False)
    return 0


def _cmd_export_comfy(args) -> int:
    from .comfy import export_comfy

    written = export_comfy(args.dir, methods=args.method or None, force=args.force)
    print(f"wrote ComfyUI node pack to {written}")
    return 0


class _MethodAction(argparse.Action):
    """``--method NAME`` starts a method; the ``-o`` options after it belong to it."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = getattr(namespace, "bench_methods", None) or []
        if option_string == "--method":
            specs.append((value, {}))
        elif not specs:
            parser.error(f"{option_string} {value[0]}=...: give --method NAME before its options")
        else:
            specs[-1][1][value[0]] = value[1]
        namespace.bench_methods = specs


def _grid(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be FRAMESxHEIGHTxWIDTH in tokens (e.g. 21x30x52), got {text!r}")
    return f, h, w


def _cmd_bench(args) -> int:
    from .bench import bench, format_table
    from .bench_shapes import ProblemShape, shape_named

    if args.shape:
        shape = shape_named(args.shape)
    else:
        missing = [n for n in ("family", "grid", "heads", "head_dim") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"bench: give --shape NAME, or --family, --grid, --heads and --head-dim (missing: "
                             f"{', '.join('--' + m.replace('_', '-') for m in missing)})")
        dim = args.heads * args.head_dim
        shape = ProblemShape("custom", args.family, "explicit shape", args.heads, args.head_dim, *args.grid,
                             text_len=args.text_len, text_position=args.text_position if args.text_len else "none",
                             layers=args.layers, steps=args.steps, dim=dim, mlp_dim=4 * dim)
    if args.shape:
        shape = shape.scaled(frames=args.frames, height=args.height, width=args.width, heads=args.heads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    specs = args.bench_methods or [(info.name, {}) for info in attnproc.methods()]
    if args.backends:
        specs = [(name, {**opts, "backend": b}) if "backend" in _option_names(name) else (name, opts)
                 for name, opts in specs for b in args.backends.split(",")]
        specs = list({(n, json.dumps(o, sort_keys=True)): (n, o) for n, o in specs}.values())
    report = bench(specs, shape, device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                   e2e=not args.no_estimate, memory=not args.no_memory, progress=not args.quiet)
    print(format_table(report))
    if args.json:
        from .media import atomic_path

        with atomic_path(Path(args.json), ".tmp.json") as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"report: {args.json}")
    return 0


def _option_names(method: str) -> set[str]:
    return {o.name for info in attnproc.methods() if info.name == method for o in info.options}


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_PIPELINE, DEFAULT_PROMPT

    p = argparse.ArgumentParser(prog="attnproc", description="Attention processors for diffusers pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list registered methods and their options")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_methods)
    d = sub.add_parser("demo", help="render a pipeline (default: a tiny offline one) with dense and with a method",
                       epilog="Options of type `any` take JSON; quote the whole NAME=VALUE for the shell, e.g. "
                              "-o 'regions=[{\"phrase\": \"a red fox\", \"box\": [0, 0, 0.5, 1]}]'")
    d.add_argument("--method", default="dense", help="method to compare against dense (see `attnproc methods`)")
    d.add_argument("--option", "-o", action="append", type=parse_option, metavar="NAME=VALUE",
                   help="a method option (repeatable)")
    d.add_argument("--out", default="attnproc-demo", help="output folder (outputs, mask picture, report.json)")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--pipeline", default=DEFAULT_PIPELINE, metavar="SPEC",
                       help=f"pipeline to render: tiny:<family>, a local folder or a hub id (default {DEFAULT_PIPELINE})")
    where.add_argument("--family", default=None, help="shorthand for --pipeline tiny:FAMILY (a random-weight tiny pipeline)")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default {DEFAULT_PROMPT!r})")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed rounds after one warm-up round, alternating dense and the method (default 3)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("render", help="render the jobs of a job file (YAML/JSON) into images/videos + manifest")
    r.add_argument("jobfile", help="job file (see docs/interfaces.md for the schema)")
    r.add_argument("--out", default=None, help="output folder (default: the job file's `output`, else "
                                               "<jobfile stem>-render)")
    r.add_argument("--compare", default=None, metavar="METHOD",
                   help="also render each job with METHOD (e.g. dense); record the difference and speedup")
    r.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="with --compare: timed rounds per job after one warm-up round, alternating the two "
                        "methods; the median and spread are reported (default 3)")
    r.add_argument("--dry-run", action="store_true",
                   help="validate every job against the pipeline (its config, not its weights), print the "
                        "expanded jobs; render nothing")
    r.add_argument("--cp", default=None, metavar="MODE=N",
                   help="context parallelism across the N processes of a torchrun / accelerate launch: "
                        "ulysses=N or ring=N; each job is split across all of them, the main process writes "
                        "(docs/context_parallel.md)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_render)
    f = sub.add_parser("finetune", help="distil a sparse student from the dense teacher (config: YAML/JSON)")
    f.add_argument("config", help="fine-tuning config (see docs/finetune.md for the fields)")
    f.add_argument("--output", default=None, help="output folder (overrides the config's `output`)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--cp", default=None, metavar="MODE=N",
                   help="context parallelism under torchrun: ulysses=N or ring=N (overrides the config's "
                        "context_parallel; docs/context_parallel.md)")
    f.set_defaults(func=_cmd_finetune)
    t = sub.add_parser("train-concept", help="learn a key-locked (Perfusion) concept from 4-20 images "
                                             "(docs/perfusion.md)")
    t.add_argument("config", nargs="?", help="optional YAML/JSON config; flags given override its fields")
    for flag, kind, text in (("pipeline", str, "shapes:sd15, tiny:sd15, a folder or hub id (SD 1.x/2.x)"),
                             ("images", str, "folder of the concept's images"),
                             ("masks", str, "folder of subject masks named like the images (optional)"),
                             ("captions", str, "folder of <image stem>.txt prompts, one a line, with {} for the token"),
                             ("token", str, "the new word, e.g. '<flag>'"),
                             ("superclass", str, "a one-token word the keys lock to, e.g. square"),
                             ("covariance", str, "the text encoder's covariance file (attnproc keylock-covariance)"),
                             ("output", str, "output folder (checkpoint, concept.safetensors)"),
                             ("steps", int, "optimizer steps (default 400)"),
                             ("batch_size", int, "images per micro-batch (default 4)"),
                             ("grad_accum", int, "micro-batches per step (default 4)"),
                             ("lr_embedding", float, "token embedding learning rate (default 0.006)"),
                             ("lr_values", float, "o*_V learning rate (default 0.03)"),
                             ("seed", int, "seed (default 0)"), ("checkpoint_every", int, "steps between checkpoints"),
                             ("mixed_precision", str, "no | fp16 | bf16")):
        t.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None, help=text)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train_concept)
    k = sub.add_parser("keylock-covariance", help="estimate a text encoder's covariance C from a caption list "
                                                  "(shared by all its key-locking concepts)")
    k.add_argument("--pipeline", required=True, help="the pipeline whose text encoder to use")
    k.add_argument("--captions", required=True, help="text file, one caption per line (the paper used ~100K)")
    k.add_argument("--output", required=True, help="covariance file to write (.safetensors)")
    k.add_argument("--ridge", type=float, default=1e-3, help="C += ridge * tr(C)/d * I (default 1e-3)")
    k.set_defaults(func=_cmd_keylock_covariance)
    u = sub.add_parser("ui", help="the gradio generation UI (needs `pip install attnproc[ui]`)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--pipeline", action="append", metavar="SPEC",
                   help="pipeline choice offered in the UI (hub id, folder, tiny:<family>); repeatable")
    u.set_defaults(func=_cmd_ui)
    b = sub.add_parser("bench", help="time methods on one attention layer of a real model's shape, on this machine",
                       epilog="Example: attnproc bench --shape wan2.1-1.3b-480p --frames 4 --heads 2 --method radial "
                              "--method gna -o kernel_size='[2,8,8]' --json bench.json")
    b.add_argument("--method", action=_MethodAction, metavar="NAME",
                   help="a method to bench (repeatable; default: every registered method)")
    b.add_argument("--option", "-o", action=_MethodAction, type=parse_option, metavar="NAME=VALUE",
                   help="an option of the --method before it (repeatable)")
    b.add_argument("--shape", default=None, help="a named shape (wan2.1-1.3b-480p, wan2.1-14b-720p, "
                                                "hunyuanvideo-720p, cogvideox-5b-720x480, flux-1024, sdxl-1024)")
    for name in ("frames", "height", "width"):
        b.add_argument(f"--{name}", type=int, default=None, help=f"scale the named shape down to this many {name} "
                                                               "of tokens")
    b.add_argument("--heads", type=int, default=None, help="scale the named shape to this many heads (or the heads "
                                                          "of an explicit shape)")
    b.add_argument("--family", default=None, help="explicit shape: the model family (wan, hunyuanvideo, flux, ...)")
    b.add_argument("--grid", type=_grid, default=None, help="explicit shape: FRAMESxHEIGHTxWIDTH tokens")
    b.add_argument("--head-dim", type=int, default=None, help="explicit shape: head dim")
    b.add_argument("--text-len", type=int, default=0, help="explicit shape: text tokens")
    b.add_argument("--text-position", default="separate", choices=("before", "after", "separate"),
                   help="explicit shape: joint text before/after the visual tokens, or cross-attention (separate)")
    b.add_argument("--layers", type=int, default=30, help="explicit shape: layers (for the schedule share)")
    b.add_argument("--steps", type=int, default=50, help="explicit shape: denoising steps (for the schedule share)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--repeats", type=int, default=5, help="alternating timed rounds (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    b.add_argument("--backends", default=None, metavar="LIST",
                   help="also bench each method with a backend option at these backends (e.g. auto,flex,gather)")
    b.add_argument("--no-estimate", action="store_true", help="skip the one-block model and the step estimate")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)
    c = sub.add_parser("export-comfy", help="write a ComfyUI custom-node pack: one node per registered method")
    c.add_argument("dir", help="folder to write (e.g. ComfyUI/custom_nodes/attnproc_nodes)")
    c.add_argument("--method", action="append", help="export only these methods (repeatable; default: all)")
    c.add_argument("--force", action="store_true", help="overwrite an existing pack folder")
    c.set_defaults(func=_cmd_export_comfy)
    return p


_PY_EXAMPLE = re.compile(r"\b([a-z_][a-z0-9_]*)=(\[.*\]|\{.*\})")


def shell_examples(message: str) -> str:
    """Rewrite Python-style examples in a library error (``regions=[{'phrase': ...}]``) as ``-o`` arguments a
    shell accepts (JSON inside single quotes), for messages shown on the command line."""
    def rewrite(m: re.Match) -> str:
        try:
            value = json.dumps(ast.literal_eval(m.group(2)))
        except (ValueError, SyntaxError, TypeError):
            return m.group(0)
        return "-o " + shlex.quote(f"{m.group(1)}={value}")
    return _PY_EXAMPLE.sub(rewrite, message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        message = shell_examples(str(e)) if args.command == "demo" else str(e)
        print(f"attnproc: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
