"""Attribute binding on the shapes world: dense vs ``structured`` (StructureDiffusion) on two-object prompts.

Prompts "a {colour1} {kind1} and a {colour2} {kind2}" over every ordered pair of different colours and
different kinds (12 × 6 = 72 prompts), ``--seeds`` seeds each (different for every prompt), the same seeds for
every arm; one pipeline call per prompt (its seeds are the batch: ``structured`` steers every row). The shapes detector (``pipelines/shapes_detect.verdict``) reads each image; per sample:

* ``binding``: every asked shape is found in its colour *and* has its kind (the red thing is a circle and the
  blue thing a square): the attribute-binding accuracy;
* ``colour``: both colours present; ``count``: exactly two shapes; ``swap``: both colours present, each with
  the other phrase's kind (the attributes exchanged); ``first/second_phrase_bound``: that phrase's colour found
  with its kind (CLIP is causal, so only the second phrase's encoding changes when encoded alone).

Arms are paired by (prompt, seed): discordant pairs (dense wrong and structured right, or the reverse) and the
two-sided exact sign-test p-value over them are reported, so a small difference is not read as a gain.

    python benchmarks/structured_binding.py [--model shapes:sd15 | /path/to/diffusers/folder] [--n 72]
        # -> benchmarks/results/structured-binding.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import attnproc
from attnproc.pipelines.shapes import COLOURS, KINDS
from attnproc.pipelines.shapes_detect import verdict
from attnproc.pipelines.shapes_models import generate

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = [("dense", None), ("structured", {"mode": "values"}), ("structured", {"mode": "conjunction"})]


def prompts_and_seeds(n: int, seeds: int, seed0: int = 7000) -> list[tuple[str, list[int]]]:
    """The first ``n`` two-object prompts, each with its own ``seeds`` seeds."""
    pairs = [(c1, k1, c2, k2) for (c1, c2) in itertools.permutations(COLOURS, 2)
             for (k1, k2) in itertools.permutations(KINDS, 2)]
    return [(f"a {c1} {k1} and a {c2} {k2}", [seed0 + seeds * i + j for j in range(seeds)])
            for i, (c1, k1, c2, k2) in enumerate(pairs[:n])]


def score(prompt: str, image) -> dict:
    v = verdict(prompt, image)
    asked = [s["asked"] for s in v["shapes"]]
    found = {f["colour"]: f["kind"] for f in reversed(v["found"])}  # the largest blob of each colour
    swap = (len(asked) == 2 and all(a["colour"] in found for a in asked)
            and found[asked[0]["colour"]] == asked[1]["kind"] and found[asked[1]["colour"]] == asked[0]["kind"])
    return {"binding": bool(v["kind"]), "colour": bool(v["colour"]), "count": bool(v["count"]), "swap": bool(swap),
            "found": v["found"]}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` vs ``losses`` (ties dropped) under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def load(model: str):
    from diffusers import DiffusionPipeline

    if model.startswith("shapes:"):
        from attnproc.pipelines.shapes_models import shapes_pipeline

        return shapes_pipeline(model[7:])
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_arm(pipe, method, options, items) -> tuple[list[dict], float]:
    rows, t0 = [], time.perf_counter()
    for prompt, seeds in items:
        if method != "dense":
            attnproc.apply(pipe, method, prompt=prompt, **options)
        try:
            images = generate(pipe, "sd15", [prompt] * len(seeds), seeds, batch=len(seeds))
        finally:
            if method != "dense":
                attnproc.remove(pipe)
        rows += [{"prompt": prompt, "seed": seed, **score(prompt, image)} for seed, image in zip(seeds, images)]
    return rows, time.perf_counter() - t0


def summary(rows: list[dict]) -> dict:
    rates = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("binding", "colour", "count", "swap")}
    for i, name in ((0, "first_phrase_bound"), (1, "second_phrase_bound")):  # CLIP is causal: phrase 1 alone = its span
        rates[name] = round(float(np.mean([_bound(r, i) for r in rows])), 4)
    return rates


def _bound(row: dict, i: int) -> bool:
    """Whether the ``i``-th asked shape's colour is found (its largest blob) with the asked kind."""
    asked = row["prompt"].split(" and ")[i].split()  # "a {colour} {kind}"
    found = {}
    for f in reversed(row["found"]):  # detections are largest first: the largest of each colour wins
        found[f["colour"]] = f["kind"]
    return found.get(asked[1]) == asked[2]


def dumps(result: dict) -> str:
    """JSON with one line per sample (the summary indented above them)."""
    head = json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1)[:-2]
    arms = ",\n".join(f' "{arm}": [\n' + ",\n".join("  " + json.dumps(r) for r in rows) + "\n ]"
                       for arm, rows in result["samples"].items())
    return head + ',\n "samples": {\n' + arms + "\n }\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes:sd15")
    ap.add_argument("--n", type=int, default=72, help="prompts (at most 72)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--arms", nargs="*", default=["dense", "values", "conjunction"])
    ap.add_argument("--out", default=str(RESULTS / "structured-binding.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    items = prompts_and_seeds(args.n, args.seeds)
    arms = [(m, o) for m, o in ARMS if (o or {}).get("mode", m) in args.arms]
    result = {"model": args.model, "prompts": len(items), "pairs": sum(len(s) for _, s in items), "call": "25 steps, guidance 2.0, 64x64 (shapes_call_kwargs)",
              "arms": {}}
    per_arm = {}
    for method, options in arms:
        label = method if options is None else f"{method}:{options['mode']}"
        rows, seconds = run_arm(pipe, method, options or {}, items)
        per_arm[label] = rows
        result["arms"][label] = {"rates": summary(rows), "seconds": round(seconds, 1)}
        print(label, result["arms"][label], flush=True)
    dense = per_arm.get("dense")
    if dense is not None:
        for label, rows in per_arm.items():
            if label == "dense":
                continue
            wins = sum(1 for d, s in zip(dense, rows) if s["binding"] and not d["binding"])
            losses = sum(1 for d, s in zip(dense, rows) if d["binding"] and not s["binding"])
            same = sum(1 for d, s in zip(dense, rows) if d["found"] == s["found"])
            result["arms"][label]["vs_dense"] = {
                "binding_gain": round(result["arms"][label]["rates"]["binding"] - result["arms"]["dense"]["rates"][
                    "binding"], 4),
                "fixed": wins, "broken": losses, "sign_test_p": round(sign_test(wins, losses), 4),
                "same_detections": same}
    result["samples"] = per_arm
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(dumps(result))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
