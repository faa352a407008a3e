"""The ``attnproc`` command line: ``methods``, ``demo``."""
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
                      progress=not args.quiet)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2, default=str))
    for name, run in report["runs"].items():
        print(f"{name}: {run['seconds']:.3f}s -> {run['output']}")
    print(f"report: {args.out}/report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnproc", description="Attention processors for diffusers pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list registered methods and their options")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_methods)
    d = sub.add_parser("demo", help="render the tiny offline Wan pipeline with dense and with a method")
    d.add_argument("--method", default="dense", help="method to compare against dense (see `attnproc methods`)")
    d.add_argument("--option", "-o", action="append", type=parse_option, metavar="NAME=VALUE",
                   help="a method option (repeatable)")
    d.add_argument("--out", default="attnproc-demo", help="output folder (videos and report.json)")
    d.add_argument("--family", default="wan21", help="tiny pipeline family (default wan21)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError) as e:
        print(f"attnproc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
