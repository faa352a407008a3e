"""What `attnproc render` and the UI write shows the rendered pixels (not a saturated or constant picture)."""
import json

import numpy as np
import pytest

from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.workflows import media
from attnproc.workflows.media import to_uint8_frames
from attnproc.workflows.render import render

from pixels import assert_has_content, assert_matches, read_frames

VIDEO = {"steps": 1, "frames": 5, "height": 64, "width": 64}


def _reference(family: str, **call) -> np.ndarray:
    """The pipeline's own output for the job, as uint8 frames."""
    out = tiny_pipeline(family)(**tiny_call_kwargs(family, output_type="np", **call))
    return to_uint8_frames(np.asarray(out.frames[0] if hasattr(out, "frames") else out.images))


@pytest.fixture(scope="module")
def wan_reference():
    return _reference("wan21", prompt="waves", num_inference_steps=1, num_frames=5, height=64, width=64)


@pytest.mark.parametrize("encoder", [True, False], ids=["mp4", "png-frames"])
def test_render_writes_the_rendered_video(tmp_path, encoder, wan_reference, monkeypatch):
    if not encoder:
        monkeypatch.setattr(media, "_mp4_writer_available", lambda: False)
    job = tmp_path / "video.json"
    job.write_text(json.dumps({"pipeline": "tiny:wan21", "defaults": VIDEO, "jobs": [{"prompt": "waves"}]}))
    render(job, tmp_path / "out", progress=False)
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    written = tmp_path / "out" / rec["output"]
    assert (written.suffix == ".mp4") == encoder and written.is_dir() != encoder
    assert_matches(read_frames(written), wan_reference, lossy=encoder)


def test_content_check_rejects_saturated_and_constant_frames(wan_reference):
    assert_has_content(wan_reference)
    for bad in (np.full_like(wan_reference, 255), np.zeros_like(wan_reference), np.full_like(wan_reference, 97)):
        with pytest.raises(AssertionError):
            assert_has_content(bad)


def test_to_uint8_frames_keeps_uint8_input():
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(to_uint8_frames(frames), frames)
    np.testing.assert_array_equal(to_uint8_frames(frames.astype(np.float32) / 255), frames)
