import pytest

from attnproc import Schedule, Site, StepContext, TokenLayout
from attnproc.families import FAMILIES


def test_joint_slices():
    before = TokenLayout(2, 3, 4, text_len=5, text_position="before")
    assert before.visual_len == 24 and before.seq_len == 29
    assert before.text_slice == slice(0, 5) and before.visual_slice == slice(5, 29)
    after = TokenLayout(2, 3, 4, text_len=5, text_position="after")
    assert after.visual_slice == slice(0, 24) and after.text_slice == slice(24, 29)
    cross = TokenLayout(1, 8, 8, text_len=77, text_position="separate")
    assert cross.seq_len == 64 and cross.text_slice == slice(0, 0)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(frames=0, height=4, width=4), "frames must be >= 1"),
    (dict(frames=1, height=4, width=4, text_position="middle"), "text_position"),
    (dict(frames=1, height=4, width=4, text_len=3), "does not fit"),
    (dict(frames=1, height=4, width=4, text_len=3, text_position="after", text_valid=4), "text_valid"),
])
def test_layout_rejects_impossible(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TokenLayout(**kwargs)


def test_unet_levels_round_up():
    unet = FAMILIES["unet"]
    base = TokenLayout(1, 13, 9)
    # 13x9 -> 7x5 -> 4x3 -> 2x2, as strided convs with padding 1 produce
    assert unet.site_layout(base, "self", 35, 35).grid == (1, 7, 5)
    assert unet.site_layout(base, "cross", 12, 77).grid == (1, 4, 3)
    with pytest.raises(RuntimeError, match="no resolution level"):
        unet.site_layout(base, "self", 50, 50)


def test_joint_layout_text_position():
    base = TokenLayout(2, 4, 4)
    assert FAMILIES["hunyuanvideo"].site_layout(base, "joint", 40, 40, 5).text_slice == slice(32, 40)
    lay = FAMILIES["cogvideox"].site_layout(base, "joint", 40, 40)
    assert lay.text_slice == slice(0, 8) and lay.visual_slice == slice(8, 40)
    with pytest.raises(RuntimeError, match="does not fit"):
        FAMILIES["flux"].site_layout(base, "joint", 20, 20)
    with pytest.raises(RuntimeError, match="does not match the visual grid"):
        FAMILIES["wan"].site_layout(base, "self", 33, 33)


def _site(layer=5, step=None, kind="self", visual=(4, 8, 8)):
    return Site("wan", "transformer", f"blocks.{layer}.attn1", 2 * layer, layer, kind, TokenLayout(*visual), step)


@pytest.mark.parametrize("first, last, num, dense_steps", [
    (0.24, 0, 50, set(range(12))),       # fraction: the reference Wan warm-up, 12 of 50
    (0.24, 0, 25, set(range(6))),        # scales with the step count
    (2, 1, 10, {0, 1, 9}),               # counts
    (0, 0.1, 20, {18, 19}),
])
def test_schedule_steps(first, last, num, dense_steps):
    sched = Schedule(dense_first_steps=first, dense_last_steps=last)
    got = {i for i in range(num) if sched.dense_here(_site(step=StepContext(i, num, 0.0)))}
    assert got == dense_steps


def test_schedule_layers_cross_and_size():
    sched = Schedule(dense_first_layers=2, min_tokens=200)
    assert sched.dense_here(_site(layer=1))
    assert not sched.dense_here(_site(layer=2))
    assert sched.dense_here(_site(layer=2, kind="cross"))  # dense_cross defaults to True
    assert not Schedule(dense_cross=False).dense_here(_site(kind="cross"))
    assert sched.dense_here(_site(layer=3, visual=(1, 8, 8)))  # 64 < 200 tokens


def test_schedule_without_step_is_explicit():
    with pytest.raises(RuntimeError, match="needs the denoising step"):
        Schedule(dense_first_steps=3).dense_here(_site(step=None))
    assert not Schedule().dense_here(_site(step=None))
