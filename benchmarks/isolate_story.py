"""Two-subject stories on the shapes world: vanilla vs ``isolate`` (IR-Diffusion).

A story is one pipeline call with ``prompt=[ref_1, ref_2, scene]``: the two subjects drawn alone ("a red
triangle", "a blue square"), then the scene with both ("a red triangle and a blue square"), from one seed.
The references are the same in both arms (isolate leaves them untouched; checked here). As in the reference
code's rehearsal, each reference subject's box is read by the detector from the reference image; the scene
boxes are fixed (left / right). Variants (``VARIANTS``): ``isolate`` (user boxes), ``isolate-auto`` (every
mask from the model's attention, Otsu), each also without mutual cross-attention (``-no-mutual``). Measured on the scene image with the detector, per story:

* merged: the scene does not show the two subjects' colours as two separate blobs (one missing, or a single
  blob where two were asked);
* consistency: each subject found in the scene (by colour) has the kind of the same-coloured shape in its
  reference image; ``both_consistent``: both subjects found and consistent;
* in_box: the share of found subjects whose blob centre lies in their scene box.

    python benchmarks/isolate_story.py [--n 48] [--mixed 24] [--variants ...] [--model PATH]   # -> benchmarks/results/isolate-story.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import attnproc
from attnproc.pipelines.shapes import COLOURS, KINDS
from attnproc.pipelines.shapes_detect import detect
from attnproc.pipelines.shapes_models import shapes_call_kwargs, shapes_pipeline
from attnproc.workflows.media import to_uint8_frames

RESULTS = Path(__file__).resolve().parent / "results"
BOXES = ([0.04, 0.25, 0.48, 0.75], [0.52, 0.25, 0.96, 0.75])
HEADLINE = (("red", "triangle"), ("blue", "square"))
# isolate arms: name -> options beyond the defaults ("isolate-auto*": every mask from attention, no boxes)
VARIANTS = {"isolate": {}, "isolate-no-mutual": {"mutual_cross": False}, "isolate-auto": {},
            "isolate-auto-no-mutual": {"mutual_cross": False}}


def stories(n: int, mixed: int) -> list[tuple[tuple[str, str], tuple[str, str], int]]:
    """The headline pair on ``n`` seeds, then ``mixed`` stories of random colour/kind pairs (distinct colours)."""
    out = [(*HEADLINE, 1000 + s) for s in range(n)]
    colours, rng = list(COLOURS), np.random.default_rng(7)
    for s in range(mixed):
        c1, c2 = rng.choice(len(colours), 2, replace=False)
        out.append(((colours[c1], KINDS[rng.integers(3)]), (colours[c2], KINDS[rng.integers(3)]), 5000 + s))
    return out


def _blob(blobs, colour):
    found = [b for b in blobs if b.colour == colour]
    return max(found, key=lambda b: b.area) if found else None


def _ref_box(image, colour, size):
    """The reference subject's box in fractions, from the detector (None if it drew no such colour)."""
    b = _blob(detect(image), colour)
    if b is None:
        return None
    x0, y0, x1, y1 = b.box
    return [x0 / size, y0 / size, x1 / size, y1 / size]


def score(scene, refs, subjects, size) -> dict:
    blobs = detect(scene)
    found = [_blob(blobs, c) for c, _ in subjects]
    asked = {c for c, _ in subjects}
    merged = any(f is None for f in found) or len([b for b in blobs if b.colour in asked]) < 2
    consistent, in_box = [], []
    for (colour, _), f, ref, box in zip(subjects, found, refs, BOXES):
        r = _blob(detect(ref), colour)
        consistent.append(f is not None and r is not None and f.kind == r.kind)
        if f is not None:
            cx, cy = f.centre
            in_box.append(box[0] * size <= cx <= box[2] * size and box[1] * size <= cy <= box[3] * size)
    return {"merged": merged, "consistent": consistent, "both_consistent": all(consistent), "in_box": in_box,
            "found": [(b.colour, b.kind) for b in blobs]}


def run(pipe, items, variant: str, size: int, ref_images=None) -> tuple[list, list]:
    scenes, refs_out = [], []
    for k, (s1, s2, seed) in enumerate(items):
        prompts = [f"a {s1[0]} {s1[1]}", f"a {s2[0]} {s2[1]}", f"a {s1[0]} {s1[1]} and a {s2[0]} {s2[1]}"]
        handle = None
        if variant != "vanilla":
            subjects = []
            for i, (s, box) in enumerate(zip((s1, s2), BOXES)):
                sub = {"phrase": f"{s[0]} {s[1]}"}
                if not variant.startswith("isolate-auto"):
                    sub["box"] = box
                    ref_box = _ref_box(ref_images[k][i], s[0], size)
                    if ref_box is not None:
                        sub["reference_box"] = ref_box
                subjects.append(sub)
            handle = attnproc.apply(pipe, "isolate", prompts=prompts, subjects=subjects, **VARIANTS[variant])
        try:
            g = torch.Generator().manual_seed(seed)
            imgs = pipe(**shapes_call_kwargs("sd15", prompts, generator=g)).images
        finally:
            if handle is not None:
                attnproc.remove(pipe)
        u8 = to_uint8_frames(np.asarray(imgs))
        refs_out.append([u8[0], u8[1]])
        scenes.append(u8[2])
    return scenes, refs_out


def _rate(xs) -> dict:
    n = len(xs)
    p = float(np.mean(xs)) if n else float("nan")
    return {"rate": round(p, 4), "n": n, "se": round(math.sqrt(p * (1 - p) / n), 4) if n else None}


def summarise(items, scenes, refs, size) -> dict:
    rows = [score(sc, rf, (s1, s2), size) for (s1, s2, _), sc, rf in zip(items, scenes, refs)]
    return {
        "merged": _rate([r["merged"] for r in rows]),
        "subject_consistent": _rate([c for r in rows for c in r["consistent"]]),
        "both_consistent": _rate([r["both_consistent"] for r in rows]),
        "in_box": _rate([b for r in rows for b in r["in_box"]]),
        "per_story": rows,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="stories per set (headline pair, then mixed pairs)")
    ap.add_argument("--mixed", type=int, default=24, help="stories of random colour/kind pairs")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="isolate arms measured against vanilla")
    ap.add_argument("--model", default=None, help="a diffusers folder instead of the packaged shapes:sd15")
    ap.add_argument("--out", default=str(RESULTS / "isolate-story.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = shapes_pipeline("sd15")
    size = shapes_call_kwargs("sd15", "x")["height"]
    items = stories(args.n, args.mixed)
    t0 = time.time()
    scenes_v, refs_v = run(pipe, items, "vanilla", size)
    result = {"model": args.model or "shapes:sd15 (packaged)", "n_headline": args.n, "n_mixed": args.mixed, "boxes": BOXES,
              "call": {k: v for k, v in shapes_call_kwargs("sd15", "x").items() if k not in ("prompt",)},
              "options": {"defaults": "start_layer 0.514, dropout 0.5, mutual_lambda 0.9", "variants": VARIANTS}, "sets": {}}
    arms = {"vanilla": (scenes_v, refs_v)}
    for variant in args.variants:
        scenes, refs = run(pipe, items, variant, size, ref_images=refs_v)
        same = all(np.array_equal(a, b) for ra, rb in zip(refs, refs_v) for a, b in zip(ra, rb))
        result.setdefault("references_identical", {})[variant] = same
        arms[variant] = (scenes, refs)
    for name, sl in (("headline: red triangle + blue square", slice(0, args.n)),
                     ("mixed colour/kind pairs", slice(args.n, args.n + args.mixed))):
        if sl.stop <= sl.start:
            continue
        result["sets"][name] = {arm: summarise(items[sl], sc[sl], rf[sl], size) for arm, (sc, rf) in arms.items()}
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, arms_ in result["sets"].items():
        print(name)
        for arm, r in arms_.items():
            print(f"  {arm:13s} merged {r['merged']['rate']:.3f}  subject-consistent {r['subject_consistent']['rate']:.3f}"
                  f"  both {r['both_consistent']['rate']:.3f}  in-box {r['in_box']['rate']:.3f}")


if __name__ == "__main__":
    main()
