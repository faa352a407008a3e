"""Region inputs: formats, resizing, layering, and the bad-input errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import attnproc
import attnproc.steer.maskmod  # noqa: F401  (registers maskmod until the package imports it)
from attnproc.pipelines import tiny_pipeline
from attnproc.pipelines.regions import load_mask, phrase_char_span, text_token_spans
from attnproc.steer.regions import grid_maps, map_frames, parse_regions, resize_to_grid

PROMPT = "a red fox in the snow"


def half(left=True, h=128, w=128, frames=None):
    m = np.zeros((h, w), dtype=bool)
    if left:
        m[:, : w // 2] = True
    else:
        m[:, w // 2:] = True
    return m if frames is None else np.stack([m] * frames)


def test_phrase_not_in_prompt_names_the_phrase():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match="'a blue whale'"):
        attnproc.apply(pipe, "maskmod", prompt=PROMPT, regions=[{"phrase": "a blue whale", "mask": half()}])
    assert not attnproc.remove(pipe)  # nothing was installed
    with pytest.raises(ValueError, match="'purple'"):
        text_token_spans(pipe, PROMPT, ["purple"])


def test_prompt_required_unless_tokens_given():
    with pytest.raises(ValueError, match="prompt"):
        attnproc.apply(tiny_pipeline("sd15"), "maskmod", regions=[{"phrase": "fox", "mask": half()}])
    pipe = tiny_pipeline("sd15")
    h = attnproc.apply(pipe, "maskmod", regions=[{"tokens": [2, 3], "mask": half()}])
    assert h.method.regions[0].tokens == [2, 3]
    attnproc.remove(pipe)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        parse_regions([{"phrase": "fox", "mask": np.zeros((64, 64))}])


@pytest.mark.parametrize("bad, match", [
    ([], "at least one region"),
    ([{"phrase": "fox"}], "exactly one of 'mask' or 'box'"),
    ([{"phrase": "fox", "mask": half(), "box": [0, 0, 1, 1]}], "exactly one"),
    ([{"phrase": "fox", "box": [0.5, 0, 0.2, 1]}], "box"),
    ([{"phrase": "fox", "mask": np.full((8, 8), 2.0)}], r"\[0, 1\]"),
    ([{"phrase": "fox", "mask": "/nonexistent/fox.png"}], "does not exist"),
    ([{"phrase": "fox", "mask": half(), "color": "red"}], "unknown key"),
    ("not json", "JSON"),
])
def test_bad_region_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_regions(bad)


def test_frame_count_mismatch_between_regions():
    with pytest.raises(ValueError, match="frame count mismatch"):
        parse_regions([{"phrase": "fox", "mask": half(frames=9)}, {"phrase": "snow", "mask": half(False, frames=5)}])


def test_frame_count_mismatch_with_the_video():
    m = torch.ones(4, 8, 8)
    with pytest.raises(ValueError, match="frame count mismatch.*4 mask frames.*3 latent frames"):
        map_frames(m, 3, "region 0")
    assert map_frames(torch.ones(9, 8, 8), 3, "r").shape[0] == 3  # causal VAE grouping 1 + 4 + 4
    assert map_frames(torch.ones(6, 8, 8), 3, "r").shape[0] == 3  # plain groups of 2
    assert map_frames(torch.ones(1, 8, 8), 3, "r").shape[0] == 3  # one mask for all frames


def test_frame_mismatch_raises_during_the_video_call():
    pipe = tiny_pipeline("wan21")
    attnproc.apply(pipe, "maskmod", prompt=PROMPT, regions=[{"phrase": "fox", "mask": half(frames=4)}])
    from attnproc.pipelines import tiny_call_kwargs

    with pytest.raises(ValueError, match="frame count mismatch"):
        pipe(**tiny_call_kwargs("wan21"))
    attnproc.remove(pipe)


def test_wrong_size_masks_are_resized_by_area():
    m = torch.zeros(1, 100, 100)
    m[:, :, :25] = 1
    r = resize_to_grid(m, 8, 8, "r")
    assert r.shape == (1, 8, 8)
    assert abs(float(r.mean()) - 0.25) < 1e-6  # area preserved
    assert resize_to_grid(torch.ones(1, 130, 126), 8, 8, "r").shape == (1, 8, 8)  # off by a few pixels: fine


def test_aspect_ratio_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        resize_to_grid(torch.ones(1, 64, 128), 8, 8, "region 0")


def test_overlapping_regions_later_lies_on_top():
    a = torch.zeros(1, 8, 8); a[:, :, :6] = 1  # noqa: E702
    b = torch.zeros(1, 8, 8); b[:, :, 4:] = 1  # noqa: E702
    regions = parse_regions([{"phrase": "sofa", "mask": a}, {"phrase": "cat", "mask": b}])
    maps = grid_maps(regions, 1, 8, 8)
    w = maps.weights.reshape(2, 8, 8)
    assert torch.equal(w[0][:, :4], torch.ones(8, 4)) and torch.equal(w[0][:, 4:], torch.zeros(8, 4))
    assert torch.equal(w[1][:, 4:], torch.ones(8, 4))
    assert float(w.sum(0).max()) <= 1.0
    assert torch.allclose(maps.area.reshape(8, 8)[:, 0], torch.full((8,), 0.5))


def test_mask_formats(tmp_path):
    img = Image.fromarray((half() * 255).astype(np.uint8))
    img.save(tmp_path / "fox.png")
    rgba = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 64, 128))
    rgba.save(tmp_path / "fox_alpha.png")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        img.save(tmp_path / "frames" / f"{i:02d}.png")
    expected = torch.from_numpy(half()).float()[None]
    for src in (tmp_path / "fox.png", str(tmp_path / "fox_alpha.png"), img, half(), torch.from_numpy(half()),
                (half() * 255).astype(np.uint8)):
        assert torch.equal(load_mask(src), expected), src
    assert load_mask(tmp_path / "frames").shape == (3, 128, 128)
    regions = parse_regions('[{"phrase": "fox", "mask": "%s"}, {"phrase": "snow", "box": [0.5, 0, 1, 1]}]'
                            % (tmp_path / "fox.png"))
    assert regions[0].mask.shape == (1, 128, 128) and regions[1].box == (0.5, 0.0, 1.0, 1.0)
    assert parse_regions([("fox", [half(), half()])])[0].frames == 2


def test_phrase_spans_per_family():
    assert phrase_char_span("A Red Fox", "red fox") == (2, 9)
    expected = {"sd15": [[2, 3]], "sdxl": [[2, 3]], "sd3": [[2, 3, 78, 79]], "flux": [[1, 2]], "wan21": [[1, 2]],
                "cogvideox": [[1, 2]]}
    for family, spans in expected.items():
        assert text_token_spans(tiny_pipeline(family), PROMPT, ["red fox"]) == spans, family


def test_unsupported_family_needs_explicit_tokens():
    pipe = tiny_pipeline("hunyuanvideo")
    with pytest.raises(ValueError, match="tokens"):
        attnproc.apply(pipe, "maskmod", prompt=PROMPT, regions=[{"phrase": "fox", "mask": half()}])
    assert not attnproc.remove(pipe)


def test_options_are_described_for_uis():
    info = {m.name: m for m in attnproc.methods()}["maskmod"]
    opts = {o.name: o for o in info.options}
    assert opts["regions"].type == "any" and opts["prompt"].type == "str"
    assert opts["cross_weight"].default == 1.0 and opts["self_weight"].default == 0.3
    assert opts["time_power"].default == 5.0 and opts["active_steps"].default == 0.3
