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

    python benchmarks/keylock_shapes.py train:flag train:ball train:flag-nolock   # parts may run in parallel
    python benchmarks/keylock_shapes.py base lock nolock preservation two
    python benchmarks/keylock_shapes.py merge                 # -> benchmarks/results/keylock-shapes.json
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
    """The detector sees the two halves: blobs of both colours, the first's centre left of (above) the second's
    by at least 2 px, their boxes touching or overlapping (gap ≤ ``gap`` px) along that axis and overlapping by
    half along the other. Overlap is allowed because the VAE bleeds one half's colour into the other's edge (a
    perfectly drawn flag after VAE encode+decode has overlapping boxes); see the ``calibrate`` part."""
    blobs = detect(image)
    a = [b for b in blobs if b.colour == colours[0]]
    b = [b for b in blobs if b.colour == colours[1]]
    k = 0 if axis == "x" else 1
    for p in a:
        for q in b:
            first, second = (p.box[k], p.box[k + 2]), (q.box[k], q.box[k + 2])
            across = (p.box[1 - k], p.box[3 - k]), (q.box[1 - k], q.box[3 - k])
            ordered = q.centre[k] - p.centre[k] >= 2
            touch = second[0] - first[1] <= gap
            overlap = min(across[0][1], across[1][1]) - max(across[0][0], across[1][0])
            if ordered and touch and overlap >= 0.5 * min(across[0][1] - across[0][0], across[1][1] - across[1][0]):
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


RUNS = {"flag": ("flag", True), "ball": ("ball", True), "flag-nolock": ("flag", False)}
PARTS = ("base", "lock", "nolock", "preservation", "two")


def setup(args):
    from attnproc.workflows.render import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cov_path = work / "C.safetensors"
    if not cov_path.exists():  # the covariance: from the world's own captions (the user's caption list)
        captions = eval_prompts("sd15", 2000, start=1_000_000_000)
        cov = cc.estimate_covariance(pipe, captions)
        cc.save_covariance(cov, cov_path, text_encoder=cc.text_fingerprint(pipe),
                           captions=len(captions), ridge=1e-3)
    return pipe, work, cov_path


def train(args, pipe, work: Path, cov_path: Path, run: str) -> dict:
    name, lock = RUNS[run]
    token, kind, colours, axis = CONCEPTS[name]
    data = make_data(work, name, args.images, seed=len(name))
    cfg = ConceptConfig(pipeline=args.model, images=str(data / "img"), masks=str(data / "mask"), token=token,
                        superclass=kind, covariance=str(cov_path), output=str(work / f"{name}-{lock}"),
                        steps=args.steps, batch_size=4, grad_accum=1, templates=["a {}"], lock_keys=lock,
                        checkpoint_every=10)
    t0 = time.perf_counter()
    res = train_concept(cfg, pipe=pipe, progress=False)
    return {"run": run, "seconds_this_process": round(time.perf_counter() - t0, 1), "resumed_from": res.resumed_from,
            "steps": res.steps, "loss_first10": float(np.mean(res.losses[:10])),
            "loss_last10": float(np.mean(res.losses[-10:])), "bytes": Path(res.concept).stat().st_size}


def concept_file(work: Path, run: str) -> str:
    name, lock = RUNS[run]
    return str(work / f"{name}-{lock}" / "concept.safetensors")


def measure(args, pipe, work: Path, cov_path: Path, part: str) -> dict:
    seeds = list(range(args.n))
    _, _, fcol, fax = CONCEPTS["flag"]
    _, _, bcol, bax = CONCEPTS["ball"]
    cov = str(cov_path)

    def rate(images, fn) -> float:
        return float(np.mean([fn(im) for im in images]))

    def sweep(alone, pair) -> dict:
        return {"appears": rate(alone, lambda im: found(im, fcol, fax)),
                "appears_in_pair": rate(pair, lambda im: found(im, fcol, fax)),
                "other_shape_kept": rate(pair, lambda im: has_colour(im, "blue"))}

    def with_concepts(files, prompts, **options):
        attnproc.apply(pipe, "keylock", concepts=files, covariance=cov, **options)
        try:
            return generate(pipe, "sd15", prompts, seeds * (len(prompts) // len(seeds)), **call)
        finally:
            attnproc.remove(pipe)

    n = args.n
    call = {"num_inference_steps": args.infer_steps} if args.infer_steps else {}
    if part == "base":  # the base model, given the superclass word where the concept would be
        imgs = generate(pipe, "sd15", ["a square"] * n + ["a square and a blue circle"] * n, seeds * 2, **call)
        return {"base_superclass_prompt": sweep(imgs[:n], imgs[n:])}
    if part in ("lock", "nolock"):
        run = "flag" if part == "lock" else "flag-nolock"
        rows = []
        for beta in args.betas:
            imgs = with_concepts([concept_file(work, run)], ["a <flag>"] * n + ["a <flag> and a blue circle"] * n,
                                 beta=beta)
            rows.append({"beta": beta, **sweep(imgs[:n], imgs[n:])})
            print(part, rows[-1], flush=True)
        return {"pareto_" + ("key_locked" if part == "lock" else "no_key_locking"): rows}
    if part == "preservation":  # held-out captions without the token, the concept loaded at its β 0.7
        held = eval_prompts("sd15", n)
        plain = generate(pipe, "sd15", held, seeds, **call)
        loaded = with_concepts([concept_file(work, "flag")], held)
        q0, q1 = quality(held, plain), quality(held, loaded)
        diff = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean() for a, b in zip(plain, loaded)]
        return {"preservation": {"colour_base": q0["colour"], "colour_with_concept": q1["colour"],
                                 "count_base": q0["count"], "count_with_concept": q1["count"],
                                 "mean_abs_pixel_diff_0_1": float(np.mean(diff))}}
    if part == "two":
        two = {}
        for multi in ("exact", "approx"):
            imgs = with_concepts([concept_file(work, "flag"), concept_file(work, "ball")],
                                 ["a <flag> and a <ball>"] * n, multi=multi, beta=0.6)
            two[multi] = {"flag": rate(imgs, lambda im: found(im, fcol, fax)),
                          "ball": rate(imgs, lambda im: found(im, bcol, bax)),
                          "both": rate(imgs, lambda im: found(im, fcol, fax) and found(im, bcol, bax))}
            Image.fromarray(np.concatenate([np.asarray(np.round(i * 255), np.uint8) for i in imgs], 1)).save(
                work / f"two-{multi}.png")
        return {"two_concepts_beta_0.6": two}
    raise ValueError(f"unknown part {part!r}; one of {PARTS}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+", help=f"train:<{'|'.join(RUNS)}>, a part ({', '.join(PARTS)}) or merge")
    ap.add_argument("--model", default="shapes:sd15", help="shapes:sd15 or a diffusers folder of the sd15 model")
    ap.add_argument("--n", type=int, default=8, help="seeds per measured prompt")
    ap.add_argument("--steps", type=int, default=60, help="training steps per concept (reference: 400)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--infer-steps", type=int, default=None, help="denoising steps (default: the model's 25)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--work", default="/tmp/keylock-shapes")
    ap.add_argument("--out", default=str(RESULTS / "keylock-shapes.json"))
    args = ap.parse_args()
    work = Path(args.work)
    if args.what == ["merge"]:
        report = {"model": args.model, "n": args.n, "images": args.images, "infer_steps": args.infer_steps or 25}
        for f in sorted(work.glob("part-*.json")):
            report.update(json.loads(f.read_text()))
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    pipe, work, cov_path = setup(args)
    for what in args.what:
        if what.startswith("train:"):
            result = {"train_" + what[6:]: train(args, pipe, work, cov_path, what[6:])}
        else:
            result = measure(args, pipe, work, cov_path, what)
        result[f"fingerprint_{what}"] = cc.model_fingerprint(pipe.unet)
        (work / f"part-{what.replace(':', '-')}.json").write_text(json.dumps(result, indent=2))
        print(what, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
