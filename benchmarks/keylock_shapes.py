"""Key-locking (Perfusion) on the shapes world: new concepts the sd15 shapes model never saw, measured by the detector.

Concepts (the dataset has one colour per shape, never two):

* ``<flag>``: a square whose left half is red and right half yellow (superclass ``square``);
* ``<ball>``: a disc whose top half is green and bottom half blue (superclass ``circle``).

Each is trained from 8 procedurally drawn images with their exact subject masks (``attnproc train-concept``'s
recipe, fewer steps for the CPU). The detector finds a concept when it sees its two colour blobs touching in the
right arrangement. Measured, over seeds:

* appearance of ``<flag>`` for "a <flag>" and "a <flag> and a blue circle" at several β, with key-locking and
  with the no-key-locking ablation (o*_K trained too), against the base model given the superclass prompt;
* text alignment: for "a <flag> and a blue circle", is the blue circle also there (the Pareto partner);
* preservation of other prompts: held-out dataset captions with the concept loaded vs without (detector colour
  rate, mean absolute pixel difference);
* two concepts in one prompt ("a <flag> and a <ball>"), exact and approximate multi-concept projection.

    python benchmarks/keylock_shapes.py [--model FOLDER] [--n 8] [--steps 120]   # -> results/keylock-shapes.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.pipelines.shapes import BACKGROUND, COLOURS
from attnproc.pipelines.shapes_detect import detect
from attnproc.pipelines.shapes_models import eval_prompts, generate, quality
from attnproc.workflows.train_concept import ConceptConfig, train_concept

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64
# concept: token, superclass, the two halves (colour names), split axis ("x": left | right, "y": top / bottom)
CONCEPTS = {"flag": ("<flag>", "square", ("red", "yellow"), "x"),
            "ball": ("<ball>", "circle", ("green", "blue"), "y")}


def draw(kind: str, colours: tuple[str, str], axis: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training image (uint8 HWC) and its subject mask: a two-colour square or disc, random size and place."""
    side = int(rng.integers(int(0.3 * SIZE), int(0.45 * SIZE) + 1))
    x0, y0 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if kind == "square":
        mask = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    else:
        mask = (xs - x0 - side / 2) ** 2 + (ys - y0 - side / 2) ** 2 <= (side / 2) ** 2
    first = (xs < x0 + side / 2) if axis == "x" else (ys < y0 + side / 2)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    img[mask & first] = COLOURS[colours[0]]
    img[mask & ~first] = COLOURS[colours[1]]
    return img, (mask * 255).astype(np.uint8)


def found(image, colours: tuple[str, str], axis: str, gap: int = 3) -> bool:
    """The detector sees the two halves: blobs of both colours, the first left of (above) the second, touching
    (gap ≤ ``gap`` px) and overlapping by half along the other axis."""
    blobs = detect(image)
    a = [b for b in blobs if b.colour == colours[0]]
    b = [b for b in blobs if b.colour == colours[1]]
    for p in a:
        for q in b:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = p.box, q.box
            if axis == "x":
                touch = -gap <= bx0 - ax1 <= gap and p.centre[0] < q.centre[0]
                overlap = min(ay1, by1) - max(ay0, by0) >= 0.5 * min(ay1 - ay0, by1 - by0)
            else:
                touch = -gap <= by0 - ay1 <= gap and p.centre[1] < q.centre[1]
                overlap = min(ax1, bx1) - max(ax0, bx0) >= 0.5 * min(ax1 - ax0, bx1 - bx0)
            if touch and overlap:
                return True
    return False


def has_colour(image, colour: str) -> bool:
    return any(b.colour == colour for b in detect(image))


def make_data(root: Path, name: str, n: int, seed: int) -> Path:
    token, kind, colours, axis = CONCEPTS[name]
    rng = np.random.default_rng(seed)
    for sub in ("img", "mask"):
        (root / name / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = draw(kind, colours, axis, rng)
        Image.fromarray(img).save(root / name / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / name / "mask" / f"{i}.png")
    return root / name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes:sd15", help="shapes:sd15 or a diffusers folder of the sd15 model")
    ap.add_argument("--n", type=int, default=8, help="seeds per measured prompt")
    ap.add_argument("--steps", type=int, default=120, help="training steps per concept (reference: 400)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--work", default="/tmp/keylock-shapes")
    ap.add_argument("--out", default=str(RESULTS / "keylock-shapes.json"))
    args = ap.parse_args()
    from attnproc.workflows.render import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "n": args.n, "steps": args.steps, "images": args.images,
                    "model_fingerprint": cc.model_fingerprint(pipe.unet)}
    # the covariance: from the world's own captions (the user's caption list)
    captions = eval_prompts("sd15", 2000, start=1_000_000_000)
    cov = cc.estimate_covariance(pipe, captions)
    cov_path = cc.save_covariance(cov, work / "C.safetensors", text_encoder=cc.encoder_fingerprint(*cc.text_parts(pipe)),
                                  captions=len(captions), ridge=1e-3)
    files, timing = {}, {}
    runs = [("flag", True), ("ball", True), ("flag", False)]
    for name, lock in runs:
        token, kind, colours, axis = CONCEPTS[name]
        data = make_data(work, name, args.images, seed=len(name))
        cfg = ConceptConfig(pipeline=args.model, images=str(data / "img"), masks=str(data / "mask"), token=token,
                            superclass=kind, covariance=str(cov_path), output=str(work / f"{name}-{lock}"),
                            steps=args.steps, batch_size=4, grad_accum=1, templates=["a {}"], lock_keys=lock,
                            checkpoint_every=max(1, args.steps // 4))
        t0 = time.perf_counter()
        res = train_concept(cfg, pipe=pipe, progress=False)
        timing[f"{name}{'' if lock else '-nolock'}"] = round(time.perf_counter() - t0, 1)
        files[(name, lock)] = res.concept
        print(f"trained {name} lock={lock} in {timing[f'{name}' + ('' if lock else '-nolock')]} s, "
              f"loss {np.mean(res.losses[:10]):.4f} -> {np.mean(res.losses[-10:]):.4f}", flush=True)
    report["train_seconds"] = timing
    report["concept_bytes"] = {f"{n}-{'lock' if l else 'nolock'}": Path(p).stat().st_size for (n, l), p in files.items()}
    seeds = list(range(args.n))
    _, _, fcol, fax = CONCEPTS["flag"]

    def rate(images, fn) -> float:
        return float(np.mean([fn(im) for im in images]))

    def sweep(prompt_imgs: dict) -> dict:
        alone, withc = prompt_imgs["a <flag>"], prompt_imgs["a <flag> and a blue circle"]
        return {"appears": rate(alone, lambda im: found(im, fcol, fax)),
                "appears_in_pair": rate(withc, lambda im: found(im, fcol, fax)),
                "other_shape_kept": rate(withc, lambda im: has_colour(im, "blue"))}

    prompts = ["a <flag>", "a <flag> and a blue circle"]
    base = {"a <flag>": generate(pipe, "sd15", ["a square"] * args.n, seeds),
            "a <flag> and a blue circle": generate(pipe, "sd15", ["a square and a blue circle"] * args.n, seeds)}
    report["base_superclass_prompt"] = sweep(base)
    print("base", report["base_superclass_prompt"], flush=True)
    curves = {}
    for lock in (True, False):
        rows = []
        for beta in args.betas:
            attnproc.apply(pipe, "keylock", concepts=[str(files[("flag", lock)])], covariance=str(cov_path), beta=beta)
            try:
                imgs = {p: generate(pipe, "sd15", [p] * args.n, seeds) for p in prompts}
            finally:
                attnproc.remove(pipe)
            rows.append({"beta": beta, **sweep(imgs)})
            print("lock" if lock else "nolock", rows[-1], flush=True)
        curves["key_locked" if lock else "no_key_locking"] = rows
    report["pareto"] = curves
    # preservation of other prompts (concept loaded at β 0.7, prompts without its token)
    held = eval_prompts("sd15", args.n)
    plain = generate(pipe, "sd15", held, seeds)
    attnproc.apply(pipe, "keylock", concepts=[str(files[("flag", True)])], covariance=str(cov_path))
    try:
        loaded = generate(pipe, "sd15", held, seeds)
    finally:
        attnproc.remove(pipe)
    q0, q1 = quality(held, plain), quality(held, loaded)
    report["preservation"] = {"colour_base": q0["colour"], "colour_with_concept": q1["colour"],
                              "count_base": q0["count"], "count_with_concept": q1["count"],
                              "mean_abs_pixel_diff": float(np.mean([np.abs(np.asarray(a, np.float64) -
                                                                           np.asarray(b, np.float64)).mean()
                                                                    for a, b in zip(plain, loaded)]))}
    print("preservation", report["preservation"], flush=True)
    # two concepts in one prompt
    _, _, bcol, bax = CONCEPTS["ball"]
    two = {}
    for multi in ("exact", "approx"):
        attnproc.apply(pipe, "keylock", concepts=[str(files[("flag", True)]), str(files[("ball", True)])],
                       covariance=str(cov_path), multi=multi, beta=0.6)
        try:
            imgs = generate(pipe, "sd15", ["a <flag> and a <ball>"] * args.n, seeds)
        finally:
            attnproc.remove(pipe)
        two[multi] = {"flag": rate(imgs, lambda im: found(im, fcol, fax)),
                      "ball": rate(imgs, lambda im: found(im, bcol, bax)),
                      "both": rate(imgs, lambda im: found(im, fcol, fax) and found(im, bcol, bax))}
        Image.fromarray(np.concatenate([np.asarray(i * 255, np.uint8) for i in imgs], 1)).save(work / f"two-{multi}.png")
    report["two_concepts_beta_0.6"] = two
    print("two", two, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
