"""Shapes world: the dataset's ground truth, the detector against it, the training recipe."""

import json
import shutil

import numpy as np
import pytest
import torch

from attnproc.pipelines.shapes import COLOURS, BACKGROUND, batch, caption, render_sample
from attnproc.pipelines.shapes_detect import detect, direction, parse_caption, track, verdict


def test_samples_are_deterministic_and_differ_by_seed():
    a, b = render_sample(5, 64, frames=9), render_sample(5, 64, frames=9)
    assert np.array_equal(a.pixels, b.pixels) and a.caption == b.caption and a.shapes == b.shapes
    assert not np.array_equal(a.pixels, render_sample(6, 64, frames=9).pixels)


def test_ground_truth_matches_pixels():
    s = render_sample(11, 64)
    for shape in s.shapes:
        x0, y0, x1, y1 = (int(round(v)) for v in shape.boxes[0])
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        assert tuple(s.pixels[0, cy + 1, cx]) == COLOURS[shape.colour]  # inside every kind near the centre
    assert tuple(s.pixels[0, 0, 0]) == BACKGROUND


def test_caption_grammar():
    s = render_sample(3, 64, frames=17)
    assert s.caption == caption(s.shapes, 64, video=True)
    words = [render_sample(i, 64).caption for i in range(40)]
    assert any(" and " in w for w in words) and any(", " in w for w in words)
    assert any(" on the " in w for w in words)
    moving = [render_sample(i, 64, frames=17).caption for i in range(20)]
    assert any("moving left" in w for w in moving) and any("moving up" in w for w in moving)


def test_motion_follows_ground_truth():
    for seed in range(10):
        s = render_sample(seed, 64, frames=17)
        for shape in s.shapes:
            (ax0, ay0, *_), (bx0, by0, *_) = shape.boxes[0], shape.boxes[-1]
            assert direction(bx0 - ax0, by0 - ay0, 1.0) == shape.motion
            assert all(0 <= v <= 64 for box in shape.boxes for v in box)


@pytest.mark.parametrize("bad, match", [
    (dict(size=8), "size must be >= 16"),
    (dict(frames=0), "frames must be >= 1"),
    (dict(max_shapes=9), "max_shapes must be in 1..4"),
])
def test_bad_sample_options(bad, match):
    with pytest.raises(ValueError, match=match):
        render_sample(0, **{"size": 64, **bad})


def test_detector_is_right_on_clean_images():
    """Colour, kind and count on 150 clean dataset images at 64² (the trained image size)."""
    wrong = []
    for seed in range(150):
        s = render_sample(seed, 64)
        v = verdict(s.caption, s.pixels[0])
        if not (v["colour"] and v["kind"] and v["count"]):
            wrong.append((seed, s.caption, v["found"]))
    assert not wrong


def _on_background(mask, colour="red"):
    a = np.full(mask.shape + (3,), BACKGROUND, np.uint8)
    a[mask] = COLOURS[colour]
    return a


def test_detector_reads_softened_shapes_as_a_person_would():
    """What a VAE or a small denoiser draws: rounded corners, a pixel of fringe, a fattened triangle.
    The fill of the box (square ≈ 1, disc ≈ π/4) reads the square as a disc; fitting whole shapes does not."""
    from attnproc.pipelines.shapes import _mask

    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    rounded = _mask("square", 64, (20, 20, 36, 36))
    for cx in (23, 33):  # corner arcs of radius 3
        for cy in (23, 33):
            corner = ((xs < 23) if cx == 23 else (xs > 33)) & ((ys < 23) if cy == 23 else (ys > 33))
            rounded &= ~(corner & ((xs - cx) ** 2 + (ys - cy) ** 2 > 9))
    rounded[36:39, 22:27] = True  # fringe under the bottom edge
    blob = detect(_on_background(rounded))[0]
    assert blob.kind == "square" and blob.fill < 0.88  # under the old rule's square threshold

    tri = _mask("triangle", 64, (20, 20, 36, 36))
    fat = tri.copy()
    fat[1:] |= tri[:-1]
    fat[:, 1:] |= tri[:, :-1]
    fat[:, :-1] |= tri[:, 1:]
    assert detect(_on_background(fat))[0].kind == "triangle"


@pytest.mark.parametrize("what", ["tall rectangle", "flat ellipse", "two merged triangles", "1.4 : 1 rectangle",
                                  "3-pixel square"])
def test_detector_calls_a_blob_no_world_shape_fits_unclear(what):
    """The world draws squares, discs and upright triangles in square boxes; anything else is no kind."""
    from attnproc.pipelines.shapes import _mask
    from attnproc.pipelines.shapes_detect import MIN_FIT

    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    mask = {
        "tall rectangle": _mask("square", 64, (20, 10, 32, 40)),
        "flat ellipse": ((xs - 32) / 14) ** 2 + ((ys - 32) / 7) ** 2 <= 1,
        "two merged triangles": _mask("triangle", 64, (10, 20, 26, 36)) | _mask("triangle", 64, (22, 20, 38, 36)),
        # fits a disc by > MIN_FIT (a square and a disc overlap by 0.85): caught by its proportions
        "1.4 : 1 rectangle": _mask("square", 64, (20, 24, 44, 41)),
        # as much a disc as a square at this size: no kind can be read
        "3-pixel square": _mask("square", 64, (30, 30, 33, 33)),
    }[what]
    (blob,) = detect(_on_background(mask), min_area_frac=0.002)
    assert blob.kind == "unclear"
    if what in ("tall rectangle", "flat ellipse", "two merged triangles"):
        assert blob.fit < MIN_FIT
    for kind in ("square", "circle", "triangle"):
        assert not verdict(f"a red {kind}", _on_background(mask))["kind"]


def test_fitting_moves_the_shape_off_a_first_guess_a_fringe_pulls_aside():
    """A bump of fringe on one side drags the centroid (the first guess) off the square; the search recovers it."""
    from attnproc.pipelines.shapes import _mask
    from attnproc.pipelines.shapes_detect import _first_guess, _fit

    crop = np.zeros((40, 40), bool)
    crop |= _mask("square", 40, (6, 6, 22, 22))
    crop[10:20, 22:28] = True  # a 10 × 6 bump on the right edge
    cx, cy, side = _first_guess("square", crop)
    first = _mask("square", 40, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    first_iou = (first & crop).sum() / (first | crop).sum()
    assert first_iou < 0.75 < _fit("square", crop)  # "unclear" at the first guess, a square after the search


def test_detector_kind_is_right_on_vae_reconstructions():
    """Held-out dataset images through the shipped image VAE (sd15's; flux shares it), ground truth known:
    the kind of nearly every shape is read right (the old fill-of-box rule: 92.7 % on 512 images)."""
    from diffusers import AutoencoderKL

    from attnproc.pipelines.shapes_models import shapes_model_dir

    vae = AutoencoderKL.from_pretrained(shapes_model_dir("sd15") / "vae").eval()
    seeds = range(3_000_000_000, 3_000_000_064)
    pix, _ = batch(list(seeds), 64, 1, 3)
    with torch.no_grad():
        rec = vae.decode(vae.encode(torch.from_numpy(pix)[:, 0]).latent_dist.mode()).sample.clamp(-1, 1)
    from attnproc.pipelines.shapes_detect import kinds_read_right

    right, total = kinds_read_right(rec, [render_sample(seed, 64) for seed in seeds])
    assert total > 100 and right / total >= 0.97, (right, total)


def test_detector_boxes_match_ground_truth():
    s = render_sample(21, 64)
    for shape in s.shapes:
        blob = next(b for b in detect(s.pixels[0]) if b.colour == shape.colour)
        assert np.allclose(blob.box, shape.boxes[0], atol=1.5)


def test_detector_accepts_float_chw_and_signed_ranges():
    s = render_sample(2, 64)
    u8 = detect(s.pixels[0])
    f01 = detect(torch.from_numpy(s.pixels[0]).permute(2, 0, 1).float() / 255)
    fpm = detect(s.pixels[0].astype(np.float32) / 127.5 - 1)
    assert u8 == f01 == fpm


def test_tracker_reads_motion_of_clean_videos():
    """Colour and motion on 40 clean videos at 32² × 17 frames (the trained video size)."""
    for seed in range(40):
        s = render_sample(seed, 32, frames=17, max_shapes=1)
        v = verdict(s.caption, list(s.pixels))
        assert v["colour"] and v["motion"] and v["count"], (seed, s.caption, v["found"])


def test_verdict_rejects_wrong_content():
    red_right = render_sample(0, 64, frames=17)
    shape = red_right.shapes[0]
    other = next(c for c in COLOURS if c != shape.colour)
    v = verdict(f"a {other} {shape.kind}", list(red_right.pixels))
    assert not v["colour"]
    blank = np.full((64, 64, 3), BACKGROUND, np.uint8)
    assert detect(blank) == [] and not verdict("a red circle", blank)["count"]
    assert track([blank] * 5) == []


def test_parse_caption():
    assert parse_caption("a red circle moving left and a blue square") == [
        {"colour": "red", "kind": "circle", "motion": "left"},
        {"colour": "blue", "kind": "square", "motion": "staying"},
    ]
    assert len(parse_caption("a red circle, a green triangle and a yellow square on the top")) == 3


def test_batch_layout_and_range():
    pix, caps = batch([1, 2], size=32, frames=3)
    assert pix.shape == (2, 3, 3, 32, 32) and pix.dtype == np.float32
    assert pix.min() >= -1 and pix.max() <= 1 and len(caps) == 2


# ----------------------------------------------------------------------------- training recipe
def _smoke(tmp_path, steps, name="run"):
    from attnproc.pipelines.shapes_train import train

    return train("flux", steps=steps, batch_size=2, seed=0, work=tmp_path / name, out=tmp_path / f"{name}-out",
                 vae_steps=1, vae_batch=2, ckpt_every=1, pool=4, cooldown=0)


def test_training_smoke_resumes_exactly_and_loads(tmp_path):
    """A few steps: the exported folder loads through DiffusionPipeline; resuming 2 → 3 steps equals 3 straight."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    _smoke(tmp_path, 2, "resumed")
    out = _smoke(tmp_path, 3, "resumed")
    _smoke(tmp_path, 3, "straight")
    a = load_file(str(tmp_path / "resumed" / "denoiser.safetensors"))
    b = load_file(str(tmp_path / "straight" / "denoiser.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # a work folder is resumed only by its own recipe, and never past --steps; a refusal changes nothing
    from attnproc.pipelines.shapes_train import train

    saved = (tmp_path / "resumed" / "denoiser.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"denoiser.safetensors is at step 3, past steps=2; pass --steps 3 or more"):
        _smoke(tmp_path, 2, "resumed")
    with pytest.raises(ValueError, match=r"denoiser.safetensors was trained with another recipe \(lr 0.001 -> 0.002\)"):
        train("flux", steps=4, batch_size=2, work=tmp_path / "resumed", out=tmp_path / "x", vae_steps=1,
              vae_batch=2, ckpt_every=1, pool=4, cooldown=0, lr=2e-3)
    with pytest.raises(ValueError, match=r"vae.safetensors was trained with another recipe \(init '[0-9a-f]+' -> "
                                         r"'[0-9a-f]+'; seed 0 -> 1\)"):
        train("flux", steps=4, batch_size=2, seed=1, work=tmp_path / "resumed", out=tmp_path / "x", vae_steps=1,
              vae_batch=2, ckpt_every=1, pool=4, cooldown=0)
    assert (tmp_path / "resumed" / "denoiser.safetensors").read_bytes() == saved and not (tmp_path / "x").exists()
    # a finished run asked again exports its EMA again (nothing left to train)
    shutil.rmtree(out)
    assert _smoke(tmp_path, 3, "resumed") == out and (out / "model_index.json").exists()
    assert (tmp_path / "resumed" / "denoiser.safetensors").read_bytes() == saved
    pipe = DiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.transformer.dtype == torch.float32
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert next(iter(exported.values())).dtype == torch.float16
    # shapes_pipeline(kind, folder) loads the retrained copy, not the packaged model
    from attnproc.pipelines import shapes_pipeline

    retrained = shapes_pipeline("flux", out).transformer.state_dict()
    assert all(torch.equal(retrained[k], v.float()) for k, v in exported.items())


def test_training_rejects_bad_options(tmp_path):
    from attnproc.pipelines.shapes_train import train

    with pytest.raises(ValueError, match="kind must be one of"):
        train("sdxl", steps=1, batch_size=1, work=tmp_path)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train("flux", steps=0, batch_size=1, work=tmp_path)
    with pytest.raises(ValueError, match="vae_batch must be >= 1"):
        train("wan21", batch_size=1, vae_batch=0, work=tmp_path)
    with pytest.raises(ValueError, match=r"cooldown must be in \[0, steps=5\], got 6"):
        train("flux", steps=5, batch_size=1, work=tmp_path, cooldown=6)
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        train("flux", steps=5, batch_size=1, work=tmp_path, lr=0)
    with pytest.raises(ValueError, match=r"timesteps must be one of \('uniform', 'logit_normal'\), got 'cosine'"):
        train("flux", steps=5, batch_size=1, work=tmp_path, timesteps="cosine")
    assert not any(tmp_path.iterdir())


def test_cooldown_rate_falls_linearly_to_zero_at_the_last_step(tmp_path, monkeypatch):
    """The rate multiplier: warm-up over 100 steps, constant, then (steps − step)/cooldown; the training loop
    applies it with the run's own steps and cooldown (a resumed run with more steps can add a cool-down)."""
    from attnproc.pipelines import shapes_train

    f = shapes_train.lr_factor
    assert [f(s, 1000, 0) for s in (0, 99, 500, 999)] == [0.01, 1.0, 1.0, 1.0]
    assert [f(s, 1000, 200) for s in (799, 800, 900, 999)] == [1.0, 1.0, 0.5, 0.005]
    calls = []
    monkeypatch.setattr(shapes_train, "lr_factor", lambda *a: calls.append(a) or f(*a))
    torch.set_num_threads(1)
    shapes_train.train("flux", steps=2, batch_size=2, work=tmp_path / "w", out=tmp_path / "o", vae_steps=1,
                       vae_batch=2, ckpt_every=2, pool=4, cooldown=2)
    assert calls == [(0, 2, 2), (1, 2, 2)]


def test_train_hands_its_timesteps_choice_to_the_loss(tmp_path, monkeypatch):
    """``train(timesteps=...)`` reaches the flow-matching loss; the default is the recipe's (flux: logit-normal)."""
    from attnproc.pipelines import shapes_train

    torch.set_num_threads(1)
    seen = []
    sample_u = shapes_train.sample_u
    monkeypatch.setattr(shapes_train, "sample_u", lambda n, gen, t: seen.append(t) or sample_u(n, gen, t))
    for name, timesteps in (("default", None), ("uniform", "uniform")):
        shapes_train.train("flux", steps=1, batch_size=2, work=tmp_path / name, out=tmp_path / f"{name}-out",
                           vae_steps=1, vae_batch=2, ckpt_every=1, pool=2, cooldown=0, timesteps=timesteps)
    assert seen == [shapes_train.SPECS["flux"].timesteps, "uniform"] == ["logit_normal", "uniform"]


def test_flux_starts_from_sd15s_vae_of_the_same_seed():
    """flux's recipe trains sd15's VAE: the same init for the same seed (and the same data), a different one per seed."""
    from attnproc.pipelines.shapes_train import build

    def vae(kind, seed):
        return build(kind, seed).vae.state_dict()

    a, b, c = vae("flux", 0), vae("sd15", 0), vae("flux", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # and the rest of flux's init is what it was before (sums of seed 0's weights as the shipped run drew them):
    # taking sd15's VAE must not shift the generator for the encoders drawn after it
    flux = build("flux", 0)
    sums = [float(sum(v.double().sum() for v in m.state_dict().values()))
            for m in (flux.transformer, flux.text_encoder, flux.text_encoder_2)]
    assert sums == pytest.approx([398.5968500310057, 334.06165918370255, 41.5278957117481], rel=1e-9)


def test_logit_normal_times_thin_out_the_ends():
    """``sample_u``: uniform puts 20 % of the times within 0.1 of an end, logit-normal (SD3) about 3 %."""
    from attnproc.pipelines.shapes_train import sample_u

    for name, share in (("uniform", 0.20), ("logit_normal", 0.028)):
        u = sample_u(20000, torch.Generator().manual_seed(0), name)
        assert ((u > 0) & (u < 1)).all()
        assert ((u < 0.1) | (u > 0.9)).float().mean().item() == pytest.approx(share, abs=0.01)
        assert u.median().item() == pytest.approx(0.5, abs=0.02)


def test_vae_loss_weights_shape_pixels():
    """wan21's VAE loss counts an error on a shape pixel (off the background) 1 + vae_fg times one on the background."""
    from attnproc.pipelines.shapes import BACKGROUND
    from attnproc.pipelines.shapes_train import SPECS, _weighted_mse

    fg = SPECS["wan21"].vae_fg
    assert fg > 0 and SPECS["sd15"].vae_fg == 0  # the image recipes keep the plain MSE
    x = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1, 1).repeat(1, 1, 2, 4, 4) / 127.5 - 1
    x[0, :, 0, 1, 1] = torch.tensor([0.7, -0.7, -0.7])  # one red pixel in frame 0
    on_shape, on_bg = x.clone(), x.clone()
    on_shape[0, 0, 0, 1, 1] += 0.5
    on_bg[0, 0, 1, 2, 2] += 0.5
    assert _weighted_mse(on_shape, x, fg) / _weighted_mse(on_bg, x, fg) == pytest.approx(1 + fg)
    assert _weighted_mse(on_bg, x, 0.0) == pytest.approx(torch.nn.functional.mse_loss(on_bg, x))


def test_wan21_recipe_smoke_exports_a_vae_whose_config_sizes_the_latents(tmp_path):
    """One step of each wan21 stage (17-frame VAE clips, weighted loss): the export keeps the VAE's real
    ÷2 time / ÷4 space factors in its config (WanPipeline sizes its latents by them) and its latent statistics."""
    from diffusers import AutoencoderKLWan

    from attnproc.pipelines.shapes_train import train

    torch.set_num_threads(1)
    out = train("wan21", steps=1, batch_size=1, work=tmp_path / "w", out=tmp_path / "o", vae_steps=1, vae_batch=1,
                ckpt_every=1, pool=1)
    cfg = AutoencoderKLWan.load_config(out / "vae")
    assert (cfg["scale_factor_temporal"], cfg["scale_factor_spatial"]) == (2, 4)
    assert len(cfg["latents_std"]) == cfg["z_dim"] and cfg["latents_std"] != [1.0] * cfg["z_dim"]
