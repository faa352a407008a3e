"""The `attnproc` command line: methods listing and the offline demo."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pixels import assert_has_content, read_frames

from attnproc.workflows.cli import main, parse_option
from attnproc.workflows.demo import run_demo


def test_methods_json_lists_registry():
    proc = subprocess.run([sys.executable, "-m", "attnproc", "methods", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert "dense" in names


def test_demo_writes_videos_and_report(tmp_path):
    report = run_demo("knobs", tmp_path, {"strength": 0.25}, pipeline="tiny:wan21", repeats=2,
                      progress=False,
                      call_overrides={"num_inference_steps": 1, "num_frames": 5, "height": 64, "width": 64})
    assert set(report["runs"]) == {"dense", "knobs"}
    diff = report["difference_to_dense"]  # pixel levels, as in render --compare and the UI
    assert diff["max_abs_diff"] == 0.0 and diff["psnr_db"] is None and diff["diff_units"].startswith("uint8")
    layout = report["runs"]["knobs"]["layout_seen"]["transformer"]
    assert (layout["frames"], layout["height"], layout["width"]) == (2, 4, 4)  # 5 frames, 64x64 px
    timing = report["timing"]  # the shared helper: warm-up, alternating rounds, total and attention apart
    assert timing["order"] == "alternating" and isinstance(timing["within_noise"], bool)
    for name in ("dense", "knobs"):
        assert timing[name]["repeats"] == 2 and timing[name]["warmup"] == 1
        assert len(timing[name]["total_s"]["runs"]) == 2 and timing[name]["attention_s"]["median"] > 0
        out = Path(report["runs"][name]["output"])
        assert out.suffix == ".mp4" or out.is_dir()
        assert_has_content(read_frames(out))
        assert report["runs"][name]["patched"] > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == "knobs" and saved["options"] == {"strength": 0.25}


def test_demo_on_an_image_family_writes_png(tmp_path):
    report = run_demo("dense", tmp_path, pipeline="tiny:sd15", repeats=1, progress=False,
                      call_overrides={"num_inference_steps": 1, "height": 64, "width": 64})
    out = Path(report["runs"]["dense"]["output"])
    assert out == tmp_path / "dense.png" and not list(tmp_path.glob("*.mp4"))
    assert read_frames(out).shape == (1, 64, 64, 3)
    assert report["timing"]["dense"]["total_s"]["runs"] and report["timing"]["dense"]["repeats"] == 1


def test_demo_refuses_a_method_the_pipeline_family_does_not_serve(tmp_path, capsys):
    assert main(["demo", "--method", "radial", "--family", "sd15", "--out", str(tmp_path), "--quiet"]) == 2
    assert "method 'radial' cannot run on tiny:sd15" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_cli_error_examples_are_valid_on_a_shell(capsys):
    import shlex

    assert main(["demo", "--method", "maskmod", "--quiet"]) == 2
    err = capsys.readouterr().err
    example = err[err.index("-o "):].strip()
    args = shlex.split(example)  # what a shell would hand over
    assert args[0] == "-o" and parse_option(args[1])[0] == "regions"
    assert isinstance(parse_option(args[1])[1], list)  # JSON, not a Python literal


def test_demo_cli_rejects_bad_option_before_rendering(tmp_path, capsys):
    assert main(["demo", "--method", "knobs", "-o", "strength=7", "--out", str(tmp_path), "--quiet"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
    assert main(["demo", "--method", "nosuch", "--out", str(tmp_path), "--quiet"]) == 2
    assert "registered methods" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("a=1", ("a", 1)), ("b=0.5", ("b", 0.5)), ("c=true", ("c", True)),
                                            ("d=hello", ("d", "hello")), ("e=[1,2]", ("e", [1, 2]))])
def test_parse_option(text, expected):
    assert parse_option(text) == expected


def test_mask_image_shows_kept_fraction():
    import numpy as np
    import torch

    from attnproc.workflows.maskviz import mask_image

    mask = torch.zeros(1000, 600, dtype=torch.bool)
    mask[:500] = True
    img = mask_image(mask, max_side=100)
    assert img.size == (100, 100)  # 600 wide /6 -> 100, 1000 tall /10 -> 100
    px = torch.from_numpy(np.asarray(img).copy())
    assert (px[:50] == 255).all() and (px[50:] == 0).all()


def test_mask_picture_has_a_legend():
    import numpy as np
    import torch

    from PIL import Image

    from attnproc.workflows.maskviz import legend_image, mask_image

    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:32] = True
    img = np.asarray(legend_image(mask, "density 0.500; a caption", size=128))
    pattern = np.asarray(mask_image(mask, max_side=128).resize((128, 128), Image.NEAREST).convert("RGB"))
    assert img.shape[1] == 128 and img.shape[0] > 128 + 30
    np.testing.assert_array_equal(img[:128], pattern)  # the pattern itself, unchanged
    strip = img[128:]
    assert (strip[6:12, 6:12] == 255).all() and (strip[6:12, 92:98] == 0).all()  # white and black swatches
    assert (strip[20:] < 100).any(axis=-1).sum() > 50  # legend text is drawn
