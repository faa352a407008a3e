"""Key-locking (Perfusion) on the shapes world: concepts trained on the sd15 shapes model, measured by the detector.

Concepts (``CONCEPTS``):

* ``<flag>``: a square whose left half is red and right half yellow (superclass ``square``), and ``<ball>``: a
  disc with a green top and blue bottom half (``circle``). The dataset has one colour per shape, never two: these
  are new appearances. Found when the detector sees the two colour blobs side by side in the right order.
* ``<rsq>`` (a red square, superclass ``square``) and ``<gci>`` (a green circle, ``circle``): one-token words for
  things the model can draw; the sanity rung of docs/perfusion.md (does the recipe learn at all on this model?).
* ``<bar>`` (a red rectangle 2.2 times wider than tall, ``square``) and ``<half>`` (a green top half-disc,
  ``circle``): new shapes (every shape of the world sits in a square box). The VAE reproduces them, unlike a new
  colour (purple, orange, cyan all decode to a palette colour). Found by colour, width/height ≥ 1.6 and fill.

Each is trained from 8 drawn images with their exact subject masks (``attnproc train-concept``). Runs
(``train:<concept>[-suffix...]``): key-locked; ``-nolock`` the no-key-locking ablation (o*_K trained too); ``-ti``
plain textual inversion (``edit: false``: the embedding alone, no edit); ``-pair`` each image beside a known shape
with a caption naming it; ``-nomask`` the loss over the whole image. Parts, for ``--concept C`` (default flag) and
its runs ``C<--suffix>``:

* ``base``: the base model given the superclass word; ``lock``/``nolock``/``ti``: how often C appears for
  "a <C>" and "a <C> and a blue circle" at several β, and whether the blue circle is kept (the Pareto partner);
* ``preservation``: held-out captions without the token, C loaded vs not (detector colour/count, pixel diff);
* ``two``: "a <C> and a <C2>" (``--concept2``), exact and approximate projection, per β; the order reversed and
  each concept beside the other's known words;
* ``two-ti``: the same prompt (and reversed) with both concepts' textual-inversion runs (tokens only, no edit);
* ``sims``: every token × both concepts: ``sim`` and the gate it opens, padding included, and the ``i*`` Gram matrix
  in the C⁻¹ metric, in one- and two-object prompts;
* ``cause``: "a <C> and a <C2>" (and each alone, and C2 after C's known words) under one change at a time: values or
  keys swapped between the concepts, untrained values, the embeddings without the edit, textual inversion, terms of
  the formula changed (``ProbeKeyLock``), ``keys="mixed"``;
* ``loss``: the masked training loss at fixed timesteps and noise, untrained vs each trained run;
* ``ceiling``: every UNet weight fine-tuned on C's images (what this model can be made to draw at all);
* ``calibrate``: the detector rule on drawn, VAE round-tripped and colour-swapped images, and on the base model's
  "a red square and a yellow square".

    python benchmarks/keylock_shapes.py train:rsq train:rsq-nolock train:rsq-ti --steps 400
    python benchmarks/keylock_shapes.py base lock nolock ti preservation --concept rsq --n 16
    python benchmarks/keylock_shapes.py two --concept rsq --concept2 gci --n 16
    python benchmarks/keylock_shapes.py --keys mixed two --concept rsq --concept2 gci --suffix=-pair --n 16
    python benchmarks/keylock_shapes.py merge                 # -> benchmarks/results/keylock-shapes.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import make_dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.pipelines.shapes import BACKGROUND, COLOURS, KINDS
from attnproc.pipelines.shapes_detect import detect
from attnproc.pipelines.shapes_models import eval_prompts, generate, quality
from attnproc.options import option
from attnproc.steer.keylock import KeyLock, KeyLockConfig
from attnproc.workflows.train_concept import ConceptConfig, train_concept

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64


class Concept(NamedTuple):
    token: str
    superclass: str
    colours: tuple[str, str]  # the two halves (one colour: the same name twice)
    axis: str | None  # "x": left | right halves, "y": top / bottom, None: one colour
    shape: str  # what is drawn: square, circle, bar (a wide rectangle), half (the top half of a disc), big (a square
    # of side 0.55–0.65 of the image: the world's are 0.20–0.34), twins (two red squares: the world never draws
    # two shapes of one colour)


CONCEPTS = {"flag": Concept("<flag>", "square", ("red", "yellow"), "x", "square"),
            "ball": Concept("<ball>", "circle", ("green", "blue"), "y", "circle"),
            "rsq": Concept("<rsq>", "square", ("red", "red"), None, "square"),
            "gci": Concept("<gci>", "circle", ("green", "green"), None, "circle"),
            "bar": Concept("<bar>", "square", ("red", "red"), None, "bar"),
            "half": Concept("<half>", "circle", ("green", "green"), None, "half"),
            "big": Concept("<big>", "square", ("red", "red"), None, "big"),
            "twins": Concept("<twins>", "square", ("red", "red"), None, "twins")}
WIDE = 1.6  # a bar or half-disc is at least this much wider than tall (drawn ≈ 2.2 and 2; every world shape ≈ 1)
BIG = 0.47  # a big square's box is at least this fraction of the image wide (drawn ≥ 0.55; the world's ≤ 0.34)


def shape_mask(shape: str, x0: float, y0: float, side: float) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of ``shape`` whose box starts at (x0, y0) and is ``side`` wide."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy = x0 + side / 2, y0 + side / 2
    if shape in ("square", "big"):
        return (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (side / 2) ** 2
    if shape == "bar":  # side wide, side / 2.2 tall
        return (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side / 2.2)
    if shape == "half":  # the top half of a disc of diameter side: side wide, side / 2 tall
        return ((xs - cx) ** 2 + (ys - y0 - side / 2) ** 2 <= (side / 2) ** 2) & (ys < y0 + side / 2)
    if shape == "triangle":
        return (ys >= y0) & (ys < y0 + side) & (np.abs(xs - cx) <= (ys - y0) / side * side / 2)
    raise ValueError(f"unknown shape {shape!r}")


def draw(c: Concept, rng: np.random.Generator, colours: tuple[str, str] | None = None,
         partner: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One training image (uint8 HWC) of concept ``c`` (``colours`` overrides its halves), random size and place,
    and its subject mask; ``partner`` (colour, kind) adds a known shape beside it, inside the mask too."""
    colours = colours or c.colours
    if c.shape == "twins":  # the second square is a partner of the concept's own colour
        c, partner = c._replace(shape="square"), (colours[0], "square")
    lo, hi = {"bar": (0.4, 0.55), "half": (0.4, 0.55), "big": (0.55, 0.65)}.get(c.shape, (0.3, 0.45))
    for _ in range(100):
        side = int(rng.integers(int(lo * SIZE), int(hi * SIZE) + 1))
        x0, y0 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2))
        mask = shape_mask(c.shape, x0, y0, side)
        other = np.zeros_like(mask)
        if partner is not None:
            pside = int(rng.integers(int(0.2 * SIZE), int(0.34 * SIZE) + 1))
            px, py = (int(v) for v in rng.integers(1, SIZE - pside - 1, size=2))
            other = shape_mask(partner[1], px, py, pside)
            grown = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            grown[max(ys.min() - 3, 0):ys.max() + 4, max(xs.min() - 3, 0):xs.max() + 4] = True
            if (grown & other).any():
                continue
        break
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    first = (xs < x0 + side / 2) if c.axis == "x" else (ys < y0 + side / 2)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    img[mask & first] = COLOURS[colours[0]]
    img[mask & ~first] = COLOURS[colours[1]]
    if partner is not None:
        img[other] = COLOURS[partner[0]]
    return img, ((mask | other) * 255).astype(np.uint8)


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


def partners(c: Concept) -> list[tuple[str, str]]:
    """Known shapes drawn beside a concept in ``-pair`` training: every (colour, kind) of the world except the
    concept's colours and the blue circle, which the evaluation prompts use (held out)."""
    return [(col, kind) for col in COLOURS for kind in KINDS
            if col not in c.colours and (col, kind) != ("blue", "circle")]


def make_data(root: Path, name: str, n: int, seed: int, pair: bool = False, orders: bool = False) -> Path:
    """``n`` images of concept ``name`` with subject masks; ``pair``: each beside a known shape, with a caption
    naming it ("a {} and a yellow triangle" or "a yellow triangle and a {}"; ``orders``: both, one a line)."""
    c = CONCEPTS[name]
    rng = np.random.default_rng(seed)
    folder = root / (name + ("-pair" if pair else "") + ("-orders" if orders else ""))
    for sub in ("img", "mask", "caption"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    choices = partners(c)
    for i in range(n):
        partner = choices[int(rng.integers(len(choices)))] if pair else None
        img, mask = draw(c, rng, partner=partner)
        Image.fromarray(img).save(folder / "img" / f"{i}.png")
        Image.fromarray(mask).save(folder / "mask" / f"{i}.png")
        words = f"a {partner[0]} {partner[1]}" if partner else ""
        text = "a {}" if not pair else ("a {} and " + words if rng.random() < 0.5 else words + " and a {}")
        if pair and orders:
            text = f"a {{}} and {words}\n{words} and a {{}}"
        (folder / "caption" / f"{i}.txt").write_text(text)
    return folder


PARTS = ("base", "lock", "nolock", "ti", "preservation", "two", "two-ti", "sims", "cause", "calibrate", "ceiling",
         "loss")
# run suffixes (combinable, e.g. bar-nomask-nolock) -> training fields; "-pair": images beside a known shape, each
# with its own caption ("-pair-orders": both orders of that caption); "-nomask": the loss over the whole image (a
# tight mask never penalises a shape's outline)
VARIANTS = {"nolock": {"lock_keys": False}, "ti": {"edit": False}, "pair": {}, "nomask": {}, "orders": {}}


def appears(image, name: str) -> bool:
    """The detector finds concept ``name`` in ``image``: the two halves (``found``), or a blob of its colour and
    shape. A bar or half-disc is a blob at least ``WIDE`` times wider than tall (every shape the world draws sits in
    a square box) filling ≥ 0.85 of its box (bar; the VAE rounds a small bar's corners to 0.88) or 0.6–0.85 (half-disc,
    drawn π/4)."""
    c = CONCEPTS[name]
    if c.axis is not None:
        return found(image, c.colours, c.axis)
    if c.shape in ("bar", "half"):
        lo, hi = (0.85, 1.01) if c.shape == "bar" else (0.6, 0.85)
        return any(b.colour == c.colours[0] and b.aspect >= WIDE and lo <= b.fill < hi for b in detect(image))
    if c.shape == "twins":
        return sum(b.colour == c.colours[0] and b.kind == "square" for b in detect(image)) >= 2
    if c.shape == "big":
        return any(b.colour == c.colours[0] and b.kind == "square" and b.box[2] - b.box[0] >= BIG * SIZE
                   for b in detect(image))
    return any(b.colour == c.colours[0] and b.kind == c.shape for b in detect(image))


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


def split_run(run: str) -> tuple[str, set[str]]:
    """``"bar-nomask-nolock"`` -> ``("bar", {"nomask", "nolock"})``."""
    name, *flags = run.split("-")
    unknown = set(flags) - set(VARIANTS)
    if name not in CONCEPTS or unknown:
        raise ValueError(f"run {run!r}: a concept ({', '.join(CONCEPTS)}) and suffixes from -{', -'.join(VARIANTS)}")
    return name, set(flags)


def train(args, pipe, work: Path, cov_path: Path, run: str) -> dict:
    name, flags = split_run(run)
    token, kind = CONCEPTS[name][:2]
    data = make_data(work, name, args.images, seed=len(name), pair="pair" in flags, orders="orders" in flags)
    fields = {k: v for flag in flags for k, v in VARIANTS[flag].items()}
    masks = None if "nomask" in flags else str(data / "mask")
    cfg = ConceptConfig(pipeline=args.model, images=str(data / "img"), masks=masks, token=token,
                        superclass=kind, covariance=str(cov_path), output=str(work / run), steps=args.steps,
                        batch_size=4, grad_accum=1, templates=["a {}"], captions=str(data / "caption"),
                        checkpoint_every=50,
                        lr_embedding=args.lr_embedding, lr_values=args.lr_values, **fields)
    t0 = time.perf_counter()
    res = train_concept(cfg, pipe=pipe, progress=False)
    return {"run": run, "seconds_this_process": round(time.perf_counter() - t0, 1), "resumed_from": res.resumed_from,
            "steps": res.steps, "lr_embedding": args.lr_embedding, "lr_values": args.lr_values,
            "loss_first50": float(np.mean(res.losses[:50])), "loss_last50": float(np.mean(res.losses[-50:])),
            "bytes": Path(res.concept).stat().st_size}


def run_tag(args) -> str:
    """What names a measurement: the runs' suffix, ``-global`` for global key-locking, the second concept's β and
    keys, ``-mixed`` for ``keys="mixed"``."""
    return (args.suffix + ("-global" if args.locking == "global" else "")
            + (f"-beta2-{args.beta2:g}" if args.beta2 is not None else "") + ("-keys2" if args.second_keys else "")
            + ("-mixed" if args.keys == "mixed" else ""))


def concept_file(work: Path, run: str) -> str:
    return str(work / run / "concept.safetensors")


def measure(args, pipe, work: Path, cov_path: Path, part: str) -> dict:
    seeds = list(range(args.n))
    n, name = args.n, args.concept
    token, kind = CONCEPTS[name][:2]
    cov = str(cov_path)
    tag = run_tag(args)
    call = {"num_inference_steps": args.infer_steps} if args.infer_steps else {}

    def rate(images, fn) -> float:
        return float(np.mean([fn(im) for im in images]))

    def sweep(alone, pair) -> dict:
        return {"n": len(alone), "appears": rate(alone, lambda im: appears(im, name)),
                "appears_in_pair": rate(pair, lambda im: appears(im, name)),
                "other_shape_kept": rate(pair, lambda im: has_colour(im, "blue"))}

    def with_concepts(files, prompts, **options):
        attnproc.apply(pipe, "keylock", concepts=files, covariance=cov, locking=args.locking, keys=args.keys,
                       **options)
        try:
            return generate(pipe, "sd15", prompts, seeds * (len(prompts) // len(seeds)), **call)
        finally:
            attnproc.remove(pipe)

    pair = [f"a {token}"] * n + [f"a {token} and a blue circle"] * n
    if part == "base":  # the base model, given the superclass word where the concept would be
        imgs = generate(pipe, "sd15", [f"a {kind}"] * n + [f"a {kind} and a blue circle"] * n, seeds * 2, **call)
        return {f"{name}_base_superclass_prompt": sweep(imgs[:n], imgs[n:])}
    if part in ("lock", "nolock"):
        run = name + args.suffix + ("" if part == "lock" else "-nolock")
        rows = []
        for beta in args.betas:
            imgs = with_concepts([concept_file(work, run)], pair, beta=beta)
            rows.append({"beta": beta, **sweep(imgs[:n], imgs[n:])})
            print(part, rows[-1], flush=True)
        return {f"{name}{tag}_pareto_" + ("key_locked" if part == "lock" else "no_key_locking"): rows}
    if part == "ti":  # plain textual inversion: the token alone, no edit
        concept = cc.load_concept(concept_file(work, f"{name}{args.suffix}-ti"))
        cc.add_tokens(pipe, [concept])
        try:
            imgs = generate(pipe, "sd15", pair, seeds * 2, **call)
        finally:
            cc.remove_tokens(pipe, [concept.token])
        return {f"{name}{args.suffix}_textual_inversion": sweep(imgs[:n], imgs[n:])}
    if part == "two-ti":  # both concepts as plain textual inversion (tokens only, no edit) in one prompt
        other = args.concept2
        concepts = [cc.load_concept(concept_file(work, f"{c}{args.suffix}-ti")) for c in (name, other)]
        words = f"a {CONCEPTS[name][2][0]} {kind}", f"a {CONCEPTS[other][2][0]} {CONCEPTS[other][1]}"
        prompts = [f"a {token} and a {CONCEPTS[other][0]}", f"a {CONCEPTS[other][0]} and a {token}",
                   f"a {token} and {words[1]}", f"{words[0]} and a {CONCEPTS[other][0]}"]  # and beside known words
        cc.add_tokens(pipe, concepts)
        try:
            imgs = generate(pipe, "sd15", [q for q in prompts for _ in seeds], seeds * len(prompts), **call)
        finally:
            cc.remove_tokens(pipe, [c.token for c in concepts])
        return {f"two_concepts_{name}_{other}{args.suffix}_textual_inversion": [
            {"prompt": q, name: rate(imgs[i * n:(i + 1) * n], lambda im: appears(im, name)),
             other: rate(imgs[i * n:(i + 1) * n], lambda im: appears(im, other)),
             "both": rate(imgs[i * n:(i + 1) * n], lambda im: appears(im, name) and appears(im, other))}
            for i, q in enumerate(prompts)]}
    if part == "preservation":  # held-out captions without the token, the concept loaded at its β 0.7
        held = eval_prompts("sd15", n)
        plain = generate(pipe, "sd15", held, seeds, **call)
        loaded = with_concepts([concept_file(work, name + args.suffix)], held)
        q0, q1 = quality(held, plain), quality(held, loaded)
        diff = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean() for a, b in zip(plain, loaded)]
        return {f"{name}{tag}_preservation": {"colour_base": q0["colour"], "colour_with_concept": q1["colour"],
                                         "count_base": q0["count"], "count_with_concept": q1["count"],
                                         "mean_abs_pixel_diff_0_1": float(np.mean(diff))}}
    if part == "two":
        other = args.concept2
        prompt = f"a {token} and a {CONCEPTS[other][0]}"
        two = {}
        files = [concept_file(work, name + args.suffix), concept_file(work, other + args.suffix)]
        if args.second_keys:  # the second concept's o*_K: its superclass's key as the second noun of a prompt
            second = cc.load_concept(files[1])
            second.keys = cc.initial_concept(pipe, second.token, second.superclass,
                                             [f"a {kind} and a {{}}"]).keys
            files[1] = second
        if args.beta2 is not None:  # per-concept β: the second concept's own, the sweep's for the first
            files[1] = {"file": files[1], "beta": args.beta2}
        reverse = f"a {CONCEPTS[other][0]} and a {token}"
        for multi in ("exact", "approx"):
            two[multi], two[multi + "_reversed"] = [], []
            for beta in args.betas:
                imgs = with_concepts(files, [prompt] * n + [reverse] * n, multi=multi, beta=beta)
                for key, part_imgs in ((multi, imgs[:n]), (multi + "_reversed", imgs[n:])):
                    two[key].append({"beta": beta, name: rate(part_imgs, lambda im: appears(im, name)),
                                     other: rate(part_imgs, lambda im: appears(im, other)),
                                     "both": rate(part_imgs, lambda im: appears(im, name) and appears(im, other))})
                    print(part, key, two[key][-1], flush=True)
                imgs = imgs[:n]
                Image.fromarray(np.concatenate([np.asarray(np.round(i * 255), np.uint8) for i in imgs], 1)).save(
                    work / f"two-{name}-{other}{tag}-{multi}-{beta}.png")
        words = f"a {CONCEPTS[name][2][0]} {kind}", f"a {CONCEPTS[other][2][0]} {CONCEPTS[other][1]}"
        # where the second concept is lost: the order reversed, and each concept beside the other's known words
        two["mixed_exact_file_beta"] = []
        for mixed in (f"a {CONCEPTS[other][0]} and a {token}", f"a {token} and {words[1]}",
                      f"{words[0]} and a {CONCEPTS[other][0]}"):
            imgs = with_concepts(files, [mixed] * n)
            two["mixed_exact_file_beta"].append({"prompt": mixed, name: rate(imgs, lambda im: appears(im, name)),
                                                 other: rate(imgs, lambda im: appears(im, other))})
            print(part, two["mixed_exact_file_beta"][-1], flush=True)
        plain = f"{words[0]} and {words[1]}"
        imgs = generate(pipe, "sd15", [plain] * n, seeds, **call)  # the words the model knows, for scale
        two["base_words"] = {"prompt": plain, name: rate(imgs, lambda im: appears(im, name)),
                             other: rate(imgs, lambda im: appears(im, other))}
        return {f"two_concepts_{name}_{other}{tag}": {"prompt": prompt, "reversed": reverse, **two}}
    if part == "sims":  # every token × both concepts: sim_c(e) and the gate it opens, and how correlated the i* are
        from attnproc.steer.keylock import gate, similarity

        other = args.concept2
        concepts = [cc.load_concept(concept_file(work, n + args.suffix)) for n in (name, other)]
        c_inv = torch.linalg.inv(cc.load_covariance(cov)[0]).float()
        i_stars = torch.stack([c.i_star for c in concepts]).float()
        gram = i_stars @ c_inv @ i_stars.t()
        t1, t2 = token, CONCEPTS[other][0]
        prompts = [f"a {t1}", f"a {t2}", f"a {t1} and a {t2}", f"a {t2} and a {t1}", f"a {t2} and a blue circle",
                   f"a blue circle and a {t2}"]
        beta = args.betas[len(args.betas) // 2]
        taus = torch.tensor([float(c.tau) for c in concepts])
        out = {"beta": beta, "tau": taus.tolist(), "i_star_gram_in_C_inverse_metric": gram.tolist(),
               "i_star_cosine_in_C_inverse_metric": float(gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt())}
        cc.add_tokens(pipe, concepts)
        try:
            for prompt in prompts:
                with torch.no_grad():
                    enc, ids = cc.encode_prompts(pipe, [prompt])
                sims = similarity(enc[0].float(), i_stars, c_inv)
                gates = gate(sims, beta, taus)
                used = len(pipe.tokenizer(prompt).input_ids)  # with the start and end tokens; the rest is padding
                toks = pipe.tokenizer.convert_ids_to_tokens(ids[0][:used])
                out[prompt] = {"tokens": [[tok, *(round(x, 3) for x in sims[j].tolist()),
                                           *(round(x, 3) for x in gates[j].tolist())] for j, tok in enumerate(toks)],
                               "padding_max_sim": [round(x, 3) for x in sims[used:].max(0).values.tolist()],
                               "padding_gate_sum": [round(x, 3) for x in gates[used:].sum(0).tolist()]}
        finally:
            cc.remove_tokens(pipe, [c.token for c in concepts])
        return {f"sims_{name}_{other}{args.suffix}": {
            "columns": ["token", f"sim {t1}", f"sim {t2}", f"gate {t1}", f"gate {t2}"], **out}}
    if part == "cause":  # interventions on "a <C> and a <C2>": which part of the edit loses the second concept
        return {f"cause_{name}_{args.concept2}{args.suffix}": cause(args, pipe, work, cov, call)}
    if part == "loss":
        return {f"{name}_fixed_noise_loss": fixed_noise_losses(args, pipe, work, cov, name)}
    if part == "ceiling":  # what the model can draw at all: the whole UNet fine-tuned on the concept's images
        return {f"{name}_full_unet_ceiling": ceiling(args, pipe, work, name, call)}
    if part == "calibrate":
        from attnproc.workflows.train_concept import encode_latents

        out = {}
        for cname in ("flag", "ball", "bar", "half", "big", "twins"):
            c = CONCEPTS[cname]
            rng = np.random.default_rng(7)
            drawn = [draw(c, rng)[0] for _ in range(n)]
            # what must not count: the halves swapped; a new shape's ordinary superclass shape (one square for twins);
            # the base model is given the closest known words
            if c.axis is not None:
                negative = [draw(c, rng, colours=c.colours[::-1])[0] for _ in range(n)]
                words = f"a {c.colours[0]} {c.superclass} and a {c.colours[1]} {c.superclass}"
            else:
                negative = [draw(c._replace(shape=c.superclass), rng)[0] for _ in range(n)]
                words = f"a {c.colours[0]} {c.superclass}" + (" and a red square" if c.shape == "twins" else "")

            def round_trip(images):
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
                with torch.no_grad():
                    d = pipe.vae.decode(encode_latents(pipe, x) / pipe.vae.config.scaling_factor).sample
                return list(((d.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())

            base = generate(pipe, "sd15", [words] * n, seeds, **call)
            out[cname] = {"drawn": rate([d / 255 for d in drawn], lambda im: appears(im, cname)),
                          "vae_round_trip": rate(round_trip(drawn), lambda im: appears(im, cname)),
                          "negative_drawn": rate([d / 255 for d in negative], lambda im: appears(im, cname)),
                          "negative_round_trip": rate(round_trip(negative), lambda im: appears(im, cname)),
                          "base_model_" + words.replace(" ", "_"): rate(base, lambda im: appears(im, cname))}
        return {"detector_calibration": out}
    raise ValueError(f"unknown part {part!r}; one of {PARTS}")


PROBES = ("paper", "keys-unprojected", "values-unprojected", "unprojected", "hard-keys")


# built with make_dataclass (a real type, not a string annotation): the module also loads by file path, unregistered
ProbeConfig = make_dataclass("ProbeConfig", [("probe", str, option(
    "paper", choices=PROBES, help="which term of the formula to change (ProbeKeyLock)"))], bases=(KeyLockConfig,))


class ProbeKeyLock(KeyLock):
    """``keylock`` with one term of the formula changed, for the ``cause`` part (a diagnostic, not a method to use).
    ``probe``: ``paper`` (unchanged); ``keys-unprojected`` (K = W_K e + Σ_c g_c o*_K,c: the token keeps its own key,
    the superclass key is added; V as the paper); ``values-unprojected`` (the reverse); ``unprojected`` (both);
    ``hard-keys`` (where the gates sum past 0.5, K = Σ_c g_c o*_K,c / Σ_c g_c: the superclass key alone, no residual
    ``W_K(e − P e)``)."""

    name = "keylock_probe"
    summary = "keylock with one term of the formula changed (benchmarks/keylock_shapes.py cause part)."
    Config = ProbeConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.probe, self._key_linear = self.config.probe, None

    def edit(self, q, k, v, site, *, inner, attn_mask=None, scale=None):
        self._key_linear = site.module.to_k if site.module is not None else None
        return super().edit(q, k, v, site, inner=inner, attn_mask=attn_mask, scale=scale)

    def project(self, e, linear, outputs, *, mixed=False):
        is_key = linear is self._key_linear
        paper = super().project(e, linear, outputs, mixed=mixed)
        unprojected = {"keys-unprojected": is_key, "values-unprojected": not is_key, "unprojected": True}
        if not unprojected.get(self.probe, False) and not (self.probe == "hard-keys" and is_key):
            return paper
        from attnproc.steer.keylock import gate, similarity

        ef = e.float()
        gates = gate(similarity(ef, self.i_stars().to(ef), self.c_inv.to(ef)), self.betas.to(ef), self.taus.to(ef))
        added = gates @ outputs.float()
        if self.probe == "hard-keys":
            total = gates.sum(-1, keepdim=True)
            return torch.where(total > 0.5, added / total.clamp_min(1e-6), paper.float()).to(e.dtype)
        return (torch.nn.functional.linear(ef, linear.weight.float(), None if linear.bias is None
                                           else linear.bias.float()) + added).to(e.dtype)


if ProbeKeyLock.name not in attnproc.registry.REGISTRY.names():  # a diagnostic: registered when this module is imported
    attnproc.register(ProbeKeyLock)


def cause(args, pipe, work: Path, cov: str, call: dict) -> dict:
    """Both concepts in "a <C> and a <C2>" (and each alone) under one change at a time: the o*_V or o*_K of the two
    concepts swapped, o*_V reset to its untrained start (the superclass value), the edit-trained embeddings without
    the edit, textual inversion, the formula probes of :class:`ProbeKeyLock` and ``keys="mixed"``; the edit's
    variants also on C2 after C's known words ("a red square and a <gci>"). Rates of C, C2 and both, of n."""
    name, other = args.concept, args.concept2
    token, token2 = CONCEPTS[name][0], CONCEPTS[other][0]
    seeds, beta = list(range(args.n)), args.betas[len(args.betas) // 2]
    words = f"a {CONCEPTS[name][2][0]} {CONCEPTS[name][1]}"  # the first concept's known words
    prompts = {"two": f"a {token} and a {token2}", "alone": f"a {token}", "alone2": f"a {token2}",
               "beside_words": f"{words} and a {token2}"}

    def load():
        return [cc.load_concept(concept_file(work, c + args.suffix)) for c in (name, other)]

    def rates(images) -> dict:
        hit = [(appears(im, name), appears(im, other)) for im in images]
        return {name: float(np.mean([a for a, _ in hit])), other: float(np.mean([b for _, b in hit])),
                "both": float(np.mean([a and b for a, b in hit]))}

    def render(concepts, probe="paper", tokens_only=False, which=("two",), keys="locked") -> dict:
        if tokens_only:
            cc.add_tokens(pipe, concepts)
        else:
            attnproc.apply(pipe, ProbeKeyLock.name, concepts=concepts, covariance=cov, beta=beta, probe=probe,
                           keys=keys)
        try:
            return {w: rates(generate(pipe, "sd15", [prompts[w]] * args.n, seeds, **call)) for w in which}
        finally:
            if tokens_only:
                cc.remove_tokens(pipe, [c.token for c in concepts])
            else:
                attnproc.remove(pipe)

    out = {"beta": beta, "multi": "exact", "prompts": prompts}
    singles = ("two", "alone", "alone2", "beside_words")
    out["paper"] = render(load(), which=singles)
    swapped = load()
    swapped[0].values, swapped[1].values = swapped[1].values, swapped[0].values
    out["values_swapped"] = render(swapped, which=("two", "alone", "alone2"))
    swapped = load()
    swapped[0].keys, swapped[1].keys = swapped[1].keys, swapped[0].keys
    out["keys_swapped"] = render(swapped)
    reset = load()
    for c in reset:
        c.values = cc.initial_concept(pipe, c.token, c.superclass, ["a {}"]).values
    out["values_untrained"] = render(reset, which=("two", "alone", "alone2"))
    out["embeddings_without_edit"] = render(load(), tokens_only=True)
    if all(Path(concept_file(work, c + args.suffix + "-ti")).exists() for c in (name, other)):
        ti = [cc.load_concept(concept_file(work, c + args.suffix + "-ti")) for c in (name, other)]
        out["textual_inversion"] = render(ti, tokens_only=True)
    for probe in PROBES[1:]:
        out[probe.replace("-", "_")] = render(load(), probe=probe, which=singles)
    out["keys_mixed"] = render(load(), probe="paper", which=singles, keys="mixed")
    for key, row in out.items():
        print("cause", key, row, flush=True)
    return out


@torch.no_grad()
def fixed_noise_losses(args, pipe, work: Path, cov: str, name: str, timesteps=(100, 300, 500, 700, 900)) -> dict:
    """The masked diffusion loss on the concept's images at fixed timesteps and noise (the training loss with its
    sampling noise removed): the superclass prompt on the base model, the untrained concept, and each trained run.
    The per-step training loss draws 4 random timesteps; its spread hides any trend over a few hundred steps."""
    from diffusers import DDPMScheduler

    from attnproc.workflows.train_concept import encode_latents

    token, kind = CONCEPTS[name][:2]
    data = make_data(work, name, args.images, seed=len(name))
    files = sorted((data / "img").glob("*.png"))

    def read(folder, mode):
        return torch.stack([torch.from_numpy(np.asarray(Image.open(data / folder / f.name).convert(mode), np.float32))
                            for f in files])

    latents = encode_latents(pipe, read("img", "RGB").permute(0, 3, 1, 2) / 127.5 - 1)
    masks = torch.nn.functional.interpolate(read("mask", "L")[:, None] / 255, size=latents.shape[-2:], mode="area")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(123)
    noises = [torch.randn(latents.shape, generator=gen) for _ in timesteps]

    def loss(prompt: str) -> float:
        enc = cc.encode_prompts(pipe, [prompt] * len(files))[0]
        total = 0.0
        for t, noise in zip(timesteps, noises):
            tt = torch.full((len(files),), t)
            target = sched.get_velocity(latents, noise, tt) if sched.config.prediction_type == "v_prediction" else noise
            err = (pipe.unet(sched.add_noise(latents, noise, tt), tt, encoder_hidden_states=enc).sample - target)
            total += float((err.square() * masks).sum() / (masks.sum() * err.shape[1]))
        return total / len(timesteps)

    out = {"timesteps": list(timesteps), f"base: a {kind}": loss(f"a {kind}")}
    runs = {"untrained concept": cc.initial_concept(pipe, token, kind, ["a {}"])}
    runs.update({run: concept_file(work, run) for run in (name, f"{name}-nolock")
                 if Path(concept_file(work, run)).exists()})
    for label, concept in runs.items():
        attnproc.apply(pipe, "keylock", concepts=[concept], covariance=cov)
        try:
            out[label] = loss(f"a {token}")
        finally:
            attnproc.remove(pipe)
    if Path(concept_file(work, f"{name}-ti")).exists():
        concept = cc.load_concept(concept_file(work, f"{name}-ti"))
        cc.add_tokens(pipe, [concept])
        try:
            out[f"{name}-ti"] = loss(f"a {token}")
        finally:
            cc.remove_tokens(pipe, [token])
    return out


def ceiling(args, pipe, work: Path, name: str, call: dict, steps: int = 200, lr: float = 1e-4) -> dict:
    """Fine-tune every UNet weight (AdamW, batch 4, unmasked v/ε loss) on the concept's 8 images with the plain
    superclass prompt, then count the concept in "a <superclass>" renders; the UNet is restored afterwards."""
    import copy

    from diffusers import DDPMScheduler

    from attnproc.workflows.train_concept import encode_latents

    _, kind = CONCEPTS[name][:2]
    data = make_data(work, name, args.images, seed=len(name))
    files = sorted((data / "img").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)) for f in files])
    latents = encode_latents(pipe, pixels.permute(0, 3, 1, 2) / 127.5 - 1)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    saved = copy.deepcopy(pipe.unet.state_dict())
    opt = torch.optim.AdamW(pipe.unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc = cc.encode_prompts(pipe, [f"a {kind}"] * 4)[0]
    losses = []
    try:
        for _ in range(steps):
            x0 = latents[torch.randint(0, len(files), (4,), generator=gen)]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (4,), generator=gen)
            target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            loss = (pipe.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=enc).sample - target).square()
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.mean().item())
        with torch.no_grad():
            imgs = generate(pipe, "sd15", [f"a {kind}"] * args.n, list(range(args.n)), **call)
    finally:
        pipe.unet.load_state_dict(saved)
    return {"steps": steps, "lr": lr, "loss_first20": float(np.mean(losses[:20])),
            "loss_last20": float(np.mean(losses[-20:])), "appears": float(np.mean([appears(i, name) for i in imgs]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+", help=f"train:<{'|'.join(CONCEPTS)}>[-nolock|-ti], a part "
                                            f"({', '.join(PARTS)}) or merge")
    ap.add_argument("--concept", default="flag", choices=list(CONCEPTS), help="the concept a part measures")
    ap.add_argument("--concept2", default="ball", choices=list(CONCEPTS), help="the second concept of 'two'")
    ap.add_argument("--lr-embedding", type=float, default=0.006, help="reference: 0.006")
    ap.add_argument("--lr-values", type=float, default=0.03, help="reference: 0.03")
    ap.add_argument("--model", default="shapes:sd15", help="shapes:sd15 or a diffusers folder of the sd15 model")
    ap.add_argument("--n", type=int, default=8, help="seeds per measured prompt")
    ap.add_argument("--steps", type=int, default=400, help="training steps per concept (the reference recipe)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--infer-steps", type=int, default=None, help="denoising steps (default: the model's 25)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--beta2", type=float, default=None, help="'two': the second concept's own β (--betas: the first's)")
    ap.add_argument("--second-keys", action="store_true",
                    help="'two': lock the second concept's keys to its superclass as the second noun ('a square and a {}')")
    ap.add_argument("--suffix", default="", help="parts measure the runs <concept><suffix>[-nolock|-ti] "
                                                 "(e.g. -pair: trained beside shapes; -nomask: unmasked loss)")
    ap.add_argument("--locking", default="local", choices=["local", "global"],
                    help="key-locking of the edit at inference (global: keys from the prompt with superclass words)")
    ap.add_argument("--keys", default="locked", choices=["locked", "mixed"],
                    help="the edit's keys at inference (mixed: each token's own key averaged with the gated superclass key)")
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
            what = f"{what}-{args.concept}{run_tag(args)}"
        result[f"fingerprint_{what}"] = cc.model_fingerprint(pipe.unet)
        (work / f"part-{what.replace(':', '-')}.json").write_text(json.dumps(result, indent=2))
        print(what, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
