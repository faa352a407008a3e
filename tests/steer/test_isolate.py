"""isolate (IR-Diffusion): the operators against float64 definitions, the edit on the tiny UNet pipelines
(references untouched, target rows exactly as defined, pass-through where inactive), bad input."""
import math

import numpy as np
import pytest
import torch

import attnproc
from attnproc.options import OptionError
from attnproc.kernels import dense_attention
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.steer.isolate import (Isolate, attention_subject_map, isolated_attention, isolation_keep, mutual_cross,
                                    otsu_threshold, reposition)

PROMPTS = ["a red fox", "a blue bird", "a red fox and a blue bird"]
SUBJECTS = [{"phrase": "red fox", "box": [0.0, 0.25, 0.5, 0.75], "reference_box": [0.25, 0.25, 0.75, 0.75]},
            {"phrase": "blue bird", "box": [0.5, 0.0, 1.0, 0.5], "reference_box": [0.0, 0.5, 0.5, 1.0]}]


def grid_mask(h, w, top, bottom, left, right):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:bottom + 1, left:right + 1] = True
    return m.flatten()


# ---- the operators ----------------------------------------------------------------------------------------
def reposition_reference(x, src, dst, h, w):
    """Float64 loop definition: mask by src, crop src's box, nearest-resize to dst's box size, paste at dst."""
    s, d = src.reshape(h, w), dst.reshape(h, w)
    rs, cs = torch.nonzero(s, as_tuple=True)
    rd, cd = torch.nonzero(d, as_tuple=True)
    st, sl, sh, sw = int(rs.min()), int(cs.min()), int(rs.max() - rs.min() + 1), int(cs.max() - cs.min() + 1)
    dt, dl, dh, dw = int(rd.min()), int(cd.min()), int(rd.max() - rd.min() + 1), int(cd.max() - cd.min() + 1)
    out = torch.zeros(x.shape, dtype=torch.float64)
    moved = torch.zeros(h * w, dtype=torch.bool)
    for r in range(dh):
        for c in range(dw):
            sr, sc = st + math.floor(r * sh / dh), sl + math.floor(c * sw / dw)
            out[..., (dt + r) * w + dl + c, :] = x[..., sr * w + sc, :].double() * float(s[sr, sc])
            moved[(dt + r) * w + dl + c] = bool(s[sr, sc])
    return out, moved


@pytest.mark.parametrize("src_box,dst_box", [((1, 4, 2, 6), (3, 7, 0, 2)), ((0, 1, 0, 1), (2, 7, 1, 7)),
                                             ((2, 6, 3, 4), (4, 4, 4, 5))])
def test_reposition_matches_the_crop_resize_paste_definition(src_box, dst_box):
    h, w = 8, 8
    x = torch.randn(2, 3, h * w, 5, generator=torch.Generator().manual_seed(0))
    src = grid_mask(h, w, *src_box)
    src[(src_box[0] * w) + src_box[2]] = False  # a hole: masked tokens move as zeros
    dst = grid_mask(h, w, *dst_box)
    got, moved = reposition(x, src, dst, h, w)
    want, want_moved = reposition_reference(x, src, dst, h, w)
    assert torch.equal(moved, want_moved)
    assert torch.equal(got.double(), want)
    assert not got[..., ~dst, :].any()  # nothing outside the target box


def test_reposition_of_an_empty_mask_moves_nothing():
    x = torch.randn(4, 16, 3)
    got, moved = reposition(x, torch.zeros(16, dtype=torch.bool), grid_mask(4, 4, 0, 1, 0, 1), 4, 4)
    assert not got.any() and not moved.any()


def test_isolation_keep_is_minus_inf_exactly_between_different_subjects():
    m = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    keep = isolation_keep(m)
    want = torch.ones(5, 5, dtype=torch.bool)
    for qi in range(5):
        for ki in range(5):
            for i in range(2):
                for j in range(2):
                    if i != j and m[i, qi] and m[j, ki]:
                        want[qi, ki] = False
    assert torch.equal(keep, want)
    assert keep[3].all() and keep[:, 3].all()  # background pixels keep every pair


def scores_reference(q, k_t, v_t, k_refs, v_refs, ref_masks, tgt_masks, h, w, ref_bias, key_keep, scale):
    """The docstring's formula in float64, term by term."""
    n, qn = tgt_masks.shape
    blocks_k, blocks_v, bias = [], [], []
    for i in range(n):
        kr, moved = reposition_reference(k_refs[i], ref_masks[i], tgt_masks[i], h, w)
        vr, _ = reposition_reference(v_refs[i], ref_masks[i], tgt_masks[i], h, w)
        b = torch.full((qn, qn), ref_bias, dtype=torch.float64)
        b[:, ~(moved & key_keep[i])] = -math.inf  # key mask (and dropped keys)
        b[~tgt_masks[i], :] = -math.inf  # query gating
        blocks_k.append(kr), blocks_v.append(vr), bias.append(b)
    bt = torch.zeros(qn, qn, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                bt[tgt_masks[i][:, None] & tgt_masks[j][None, :]] = -math.inf
    kk = torch.cat(blocks_k + [k_t.double()], -2)
    vv = torch.cat(blocks_v + [v_t.double()], -2)
    s = q.double() @ kk.transpose(-1, -2) * scale + torch.cat(bias + [bt], -1)
    return torch.softmax(s, -1) @ vv


def test_isolated_attention_matches_the_float64_formula():
    g = torch.Generator().manual_seed(1)
    h, w, H, D, n = 6, 6, 2, 8, 2
    q, k_t, v_t = (torch.randn(H, h * w, D, generator=g) for _ in range(3))
    k_refs, v_refs = torch.randn(n, H, h * w, D, generator=g), torch.randn(n, H, h * w, D, generator=g)
    ref_masks = torch.stack([grid_mask(h, w, 1, 3, 1, 4), grid_mask(h, w, 2, 5, 0, 2)])
    tgt_masks = torch.stack([grid_mask(h, w, 0, 2, 0, 2), grid_mask(h, w, 3, 5, 3, 5)])
    key_keep = torch.rand(n, h * w, generator=g) > 0.3
    got = isolated_attention(q, k_t, v_t, k_refs, v_refs, ref_masks, tgt_masks, h, w, ref_bias=0.5,
                             key_keep=key_keep, scale=0.3)
    want = scores_reference(q, k_t, v_t, k_refs, v_refs, ref_masks, tgt_masks, h, w, 0.5, key_keep, 0.3)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # pixels outside every subject: plain self-attention over the target only
    bg = ~(tgt_masks.any(0))
    plain = dense_attention(q[None], k_t[None], v_t[None], scale=0.3)[0]
    torch.testing.assert_close(got[:, bg], plain[:, bg], atol=2e-6, rtol=1e-5)


def test_mutual_cross_blends_inside_the_masks_only():
    g = torch.Generator().manual_seed(2)
    H, Q, T, D = 2, 16, 7, 4
    q = torch.randn(H, Q, D, generator=g)
    hv = torch.randn(H, Q, D, generator=g)
    kr, vr = torch.randn(2, H, T, D, generator=g), torch.randn(2, H, T, D, generator=g)
    m = torch.zeros(2, Q, dtype=torch.bool)
    m[0, :5] = True
    m[1, 3:9] = True  # overlap at 3, 4: the mean of both subjects
    got = mutual_cross(hv, q, kr, vr, m, 0.9)
    h = [torch.softmax(q.double() @ kr[i].double().transpose(-1, -2) / 2.0, -1) @ vr[i].double() for i in range(2)]
    want = hv.double().clone()
    for p in range(Q):
        subs = [i for i in range(2) if m[i, p]]
        if subs:
            want[:, p] = 0.1 * hv[:, p].double() + 0.9 * sum(h[i][:, p] for i in subs) / len(subs)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[:, 9:], hv[:, 9:])


def test_otsu_threshold_maximises_between_class_variance():
    rng = np.random.default_rng(0)
    x = torch.tensor(np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.8, 0.05, 100)]))
    t = otsu_threshold(x)
    best = max(np.unique(x.numpy())[:-1], key=lambda c: (lambda a, b: len(a) * len(b) * (a.mean() - b.mean()) ** 2)(
        x.numpy()[x.numpy() <= c], x.numpy()[x.numpy() > c]))
    fg = x > t
    assert int(fg.sum()) == int((x > best).sum()) == 100


def test_attention_subject_map_is_the_power_series():
    g = torch.Generator().manual_seed(3)
    s = torch.softmax(torch.randn(9, 9, generator=g), -1)
    c = torch.rand(9, generator=g)
    m = sum(torch.linalg.matrix_power(s.double(), p) @ c.double() for p in range(1, 5)) / 4
    want = (m - m.min()) / (m.max() - m.min())
    torch.testing.assert_close(attention_subject_map(s, c, 4).double(), want, atol=1e-6, rtol=0)


# ---- the edit on the tiny pipelines ------------------------------------------------------------------------
def run(pipe, name, **over):
    kw = tiny_call_kwargs(name, **{"prompt": PROMPTS, "num_inference_steps": 3, "height": 64, "width": 64, **over})
    kw["generator"] = torch.Generator().manual_seed(0)
    return pipe(**kw).images


@pytest.fixture(scope="module")
def sd15():
    pipe = tiny_pipeline("sd15")
    return pipe, run(pipe, "sd15")


def test_references_are_untouched_and_the_scene_changes(sd15):
    pipe, vanilla = sd15
    attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=SUBJECTS)
    try:
        out = run(pipe, "sd15")
    finally:
        attnproc.remove(pipe)
    assert torch.equal(out[:2], vanilla[:2])
    assert (out[2] - vanilla[2]).abs().max() > 1e-3


def test_everything_off_is_bit_identical(sd15):
    pipe, vanilla = sd15
    attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=SUBJECTS, reposition=False, isolation=False,
                   mutual_cross=False)
    try:
        assert torch.equal(run(pipe, "sd15"), vanilla)
    finally:
        attnproc.remove(pipe)


def test_target_rows_follow_the_definition_at_every_self_attention_call(sd15):
    """Each self-attention call: reference rows dense, target rows isolated_attention with the layer's choice of
    reposition (by position ≥ start_layer) and the masks, uncond rows untouched when branches='cond'."""
    pipe, _ = sd15
    handle = attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=SUBJECTS, branches="cond", start_layer=0.5,
                            ref_bias=0.3)
    method = handle.method
    calls, inner = [], method.attention

    def attention(q, k, v, site, *, attn_mask=None, scale=None):
        out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if site.kind == "self":
            calls.append((q, k, v, site, scale, out))
        return out

    method.attention = attention
    try:
        run(pipe, "sd15", num_inference_steps=2)
    finally:
        attnproc.remove(pipe)
    assert {round(method.positions[c[3].name], 3) >= 0.5 for c in calls} == {True, False}
    for q, k, v, site, scale, out in calls:
        dense = dense_attention(q, k, v, scale=scale)
        assert site.layout.branches == ("uncond", "cond") and q.shape[0] == 6
        torch.testing.assert_close(out[:5], dense[:5], atol=1e-6, rtol=0)  # uncond chunk and the references
        tgt, ref = method.masks(site, 0)
        _, h, w = site.layout.grid
        repos = method.positions[site.name] >= 0.5
        want = isolated_attention(q[5], k[5], v[5], k[3:5], v[3:5], ref, tgt, h, w, reposition_refs=repos,
                                  ref_bias=0.3, key_keep=method._key_keep(site, 0, h * w) if repos else None,
                                  scale=scale)
        torch.testing.assert_close(out[5], want, atol=1e-6, rtol=0)
        if repos:
            assert not torch.allclose(out[5], dense[5], atol=1e-4)


def test_attention_masks_come_from_the_previous_step(sd15):
    pipe, vanilla = sd15
    handle = attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=[{"phrase": "red fox"}, {"phrase": "blue bird"}])
    seen = {}
    method, inner = handle.method, handle.method.attention

    def attention(q, k, v, site, *, attn_mask=None, scale=None):
        out = inner(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if site.kind == "self":
            tgt, ref = method.masks(site, 0)
            seen.setdefault(site.step.index, []).append((int(tgt.sum()), int(ref.sum()), site.layout.visual_len))
        return out

    method.attention = attention
    try:
        out = run(pipe, "sd15")
    finally:
        attnproc.remove(pipe)
    assert all(t == 0 and r == 0 for t, r, _ in seen[0])  # nothing recorded before the first step
    for step in (1, 2):
        assert all(0 < t < n and 0 < r <= 2 * n for t, r, n in seen[step])
    assert torch.equal(out[:2], vanilla[:2]) and not torch.equal(out[2], vanilla[2])
    assert method.reference_tokens == [[2, 3], [2, 3]] and method.target_tokens == [[2, 3], [6, 7]]


def test_layer_positions_follow_the_forward_down_mid_up():
    """Positions are in execution order (diffusers registers mid_block after up_blocks): SDXL's 0.514 is the
    reference's "self-attention layer 36 of 70 and later", the decoder from the third layer of up_blocks.0."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # SDXL's block layout (transformer depths 0/2/10), tiny widths
        sample_size=8, block_out_channels=(8, 16, 32), layers_per_block=2, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(1, 2, 4), norm_num_groups=4, addition_embed_type=None).to("meta")
    method = attnproc.create("isolate", subjects=SUBJECTS)
    method.bind(unet)
    names = sorted(method.positions, key=method.positions.get)
    assert len(names) == 70 and [n.split(".")[0] for n in names] == ["down_blocks"] * 24 + ["mid_block"] * 10 + \
        ["up_blocks"] * 36
    chosen = [n for n in names if method.positions[n] >= 0.514]
    assert len(chosen) == 34 and chosen[0].startswith("up_blocks.0.attentions.0.transformer_blocks.2.")


def test_sdxl_and_num_images_per_prompt():
    pipe = tiny_pipeline("sdxl")
    kw = dict(num_images_per_prompt=2)
    vanilla = run(pipe, "sdxl", **kw)
    attnproc.apply(pipe, ["dense", "isolate"], isolate={"prompts": PROMPTS, "subjects": SUBJECTS})
    try:
        out = run(pipe, "sdxl", **kw)
    finally:
        attnproc.remove(pipe)
    assert out.shape[0] == 6
    assert torch.equal(out[:4], vanilla[:4])  # [ref_1 ×2, ref_2 ×2] untouched
    assert (out[4:] - vanilla[4:]).abs().amax((1, 2, 3)).min() > 1e-4  # both stories' scenes edited


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    ({"prompts": PROMPTS, "subjects": [{"phrase": "green cat", "box": [0, 0, 0.5, 1]}, SUBJECTS[1]]},
     "phrase 'green cat'"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS + [{"phrase": "red fox", "box": [0, 0, 1, 1]}]},
     "3 subject(s) need 3 reference prompt(s) and the scene prompt"),
    ({"subjects": [{"phrase": "red fox", "box": [0, 0, 2, 1]}]}, "'box' [0, 0, 2, 1] must satisfy"),
    ({"subjects": [{"phrase": "red fox", "mask": np.ones((8, 8)), "reference_box": [0, 0, 1, 1]},
                   {"phrase": "blue bird", "mask": np.ones((16, 16)), "reference_box": [0, 0, 1, 1]}]},
     "scene masks differ in size"),
    ({"subjects": [{"phrase": "red fox", "box": [0, 0, 1, 1]}]}, "its mask comes from the attention"),
    ({"subjects": [{"phrase": "red fox", "where": [0, 0, 1, 1]}]}, "unknown key(s) ['where']"),
    ({"subjects": SUBJECTS, "mutual_lambda": 1.5}, "mutual_lambda"),
    ({"subjects": SUBJECTS, "start_step": 0.6, "end_step": 0.2}, "end_step (0.2) must be >= start_step (0.6)"),
])
def test_bad_options_are_refused_with_a_clear_error(options, message):
    with pytest.raises(OptionError) as e:
        attnproc.create("isolate", **options)
    assert message in str(e.value)


def test_too_few_references_in_the_batch_is_refused_and_nothing_changes(sd15):
    pipe, vanilla = sd15
    attnproc.apply(pipe, "isolate", subjects=SUBJECTS)
    try:
        with pytest.raises(RuntimeError, match=r"2 subject\(s\), so each batch must hold 2 reference image\(s\) then "
                                               r"the scene .* got 1 image\(s\) per guidance branch"):
            run(pipe, "sd15", prompt=PROMPTS[-1])
    finally:
        attnproc.remove(pipe)
    assert torch.equal(run(pipe, "sd15"), vanilla)


def test_mask_of_the_wrong_aspect_is_refused(sd15):
    pipe, _ = sd15
    subjects = [{**SUBJECTS[0], "box": None, "mask": np.ones((10, 40))}, SUBJECTS[1]]
    subjects[0].pop("box")
    attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=subjects)
    try:
        with pytest.raises(ValueError, match="does not match the aspect ratio"):
            run(pipe, "sd15")
    finally:
        attnproc.remove(pipe)


def test_unsupported_family_is_refused_at_apply():
    pipe = tiny_pipeline("flux")
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(attnproc.UnsupportedFamilyError, match="isolate"):
        attnproc.apply(pipe, "isolate", subjects=SUBJECTS)
    assert pipe.transformer.attn_processors == before


# ---- job files ---------------------------------------------------------------------------------------------
def test_job_file_renders_the_story_and_keeps_the_scene(tmp_path):
    """examples/isolate_story_tiny.yaml: the `prompts` option is the batch; the saved image is its last one, the scene."""
    from pathlib import Path

    from PIL import Image

    from attnproc.workflows.cli import main
    from attnproc.workflows.media import to_uint8_frames

    jobfile = Path(__file__).parents[2] / "examples" / "isolate_story_tiny.yaml"
    assert main(["render", str(jobfile), "--out", str(tmp_path), "--quiet"]) == 0
    saved = np.asarray(Image.open(next(tmp_path.glob("story-*.png"))).convert("RGB")).astype(int)
    pipe = tiny_pipeline("sd15")
    attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=[
        {"phrase": "red fox", "box": [0.0, 0.25, 0.5, 0.75], "reference_box": [0.25, 0.25, 0.75, 0.75]},
        {"phrase": "blue bird", "box": [0.5, 0.25, 1.0, 0.75], "reference_box": [0.25, 0.25, 0.75, 0.75]}])
    try:
        kw = tiny_call_kwargs("sd15", prompt=PROMPTS, num_inference_steps=2, height=64, width=64, output_type="np")
        kw["generator"] = torch.Generator().manual_seed(0)
        images = pipe(**kw).images
    finally:
        attnproc.remove(pipe)
    frames = [to_uint8_frames(images[i])[0].astype(int) for i in range(3)]
    assert np.abs(saved - frames[2]).max() <= 1
    assert np.abs(saved - frames[0]).max() > 1


# ---- ComfyUI -----------------------------------------------------------------------------------------------
def test_comfyui_override_refuses_isolate_and_names_its_node():
    """ComfyUI's conditioning gives one prompt for the whole batch, so the attention override cannot serve the
    story batch; the pack's own node does (workflows/comfy_steer.py, tests/workflows/test_comfy_steer.py)."""
    from attnproc.workflows.comfy import node_specs
    from attnproc.workflows.comfy_runtime import install

    assert [s["node_id"] for s in node_specs(["isolate"])] == ["AttnProcIsolate"]

    class ModelPatcher:
        model = type("BaseModel", (), {})()
        model_options = {"transformer_options": {}}

    with pytest.raises(ValueError, match="method 'isolate' needs a batch with one prompt per image.*own node "
                                         "'AttnProcIsolate'"):
        install(ModelPatcher(), attnproc.create("isolate", subjects=SUBJECTS))


def test_bad_subjects_at_apply_leave_the_pipeline_untouched(sd15):
    pipe, _ = sd15
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(OptionError, match="phrase 'green cat'"):
        attnproc.apply(pipe, "isolate", prompts=PROMPTS, subjects=[{"phrase": "green cat"}, SUBJECTS[1]])
    assert pipe.unet.attn_processors == before
