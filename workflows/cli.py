"""The ``attnproc`` command line: ``methods``, ``demo``, ``render``, ``ui``, ``export-comfy``."""
from __future__ import annotations

import argparse
import json
import sys

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

    report = run_demo(args.method, args.out, dict(args.option or []), family=args.family, seed=args.seed,
                      progress=not args.quiet, prompt=args.prompt)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2, default=str))
    for name, run in report["runs"].items():
        print(f"{name}: {run['seconds']:.3f}s -> {run['output']}")
    print(f"report: {args.out}/report.json")
    return 0


def _cmd_render(args) -> int:
    from .jobs import load_jobfile
    from .render import render

    jobfile = load_jobfile(args.jobfile)
    if args.dry_run:
        for job in jobfile.jobs:
            print(json.dumps({"job": job.index, "hash": jobfile.hash_of(job), **jobfile.config_of(job)},
                             default=str))
        return 0
    summary = render(jobfile, args.out, compare=args.compare, progress=not args.quiet)
    if "done" in summary:  # the main process prints the summary
        print(json.dumps(summary, indent=2))
    return 1 if summary.get("failed") else 0


def _cmd_ui(args) -> int:
    from attnproc.ui.app import launch

    launch(host=args.host, port=args.port, pipelines=args.pipeline or None, share=False)
    return 0


def _cmd_export_comfy(args) -> int:
    from .comfy import export_comfy

    written = export_comfy(args.dir, methods=args.method or None, force=args.force)
    print(f"wrote ComfyUI node pack to {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnproc", description="Attention processors for diffusers pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list registered methods and their options")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_methods)
    d = sub.add_parser("demo", help="render the trained shapes video model with dense and with a method")
    d.add_argument("--method", default="dense", help="method to compare against dense (see `attnproc methods`)")
    d.add_argument("--option", "-o", action="append", type=parse_option, metavar="NAME=VALUE",
                   help="a method option (repeatable)")
    d.add_argument("--out", default="attnproc-demo", help="output folder (videos and report.json)")
    d.add_argument("--family", default="shapes:wan21",
                   help="shapes:KIND (trained: wan21, sd15, flux) or a tiny random-weight family (default shapes:wan21)")
    d.add_argument("--prompt", default=None, help='prompt (default "a red circle moving right" for shapes models)')
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("render", help="render the jobs of a job file (YAML/JSON) into images/videos + manifest")
    r.add_argument("jobfile", help="job file (see docs/interfaces.md for the schema)")
    r.add_argument("--out", default=None, help="output folder (default: the job file's `output`, else "
                                               "<jobfile stem>-render)")
    r.add_argument("--compare", default=None, metavar="METHOD",
                   help="also render each job with METHOD (e.g. dense); record the difference and speedup")
    r.add_argument("--dry-run", action="store_true", help="validate and print the expanded jobs; render nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_render)
    u = sub.add_parser("ui", help="the gradio generation UI (needs `pip install attnproc[ui]`)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--pipeline", action="append", metavar="SPEC",
                   help="pipeline choice offered in the UI (hub id, folder, tiny:<family>); repeatable")
    u.set_defaults(func=_cmd_ui)
    c = sub.add_parser("export-comfy", help="write a ComfyUI custom-node pack: one node per registered method")
    c.add_argument("dir", help="folder to write (e.g. ComfyUI/custom_nodes/attnproc_nodes)")
    c.add_argument("--method", action="append", help="export only these methods (repeatable; default: all)")
    c.add_argument("--force", action="store_true", help="overwrite an existing pack folder")
    c.set_defaults(func=_cmd_export_comfy)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        print(f"attnproc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
