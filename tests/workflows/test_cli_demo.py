"""The `attnproc` command line: methods listing and the offline demo."""
import json
import subprocess
import sys

import pytest

from attnproc.workflows.cli import main, parse_option
from attnproc.workflows.demo import run_demo


def test_methods_json_lists_registry():
    proc = subprocess.run([sys.executable, "-m", "attnproc", "methods", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert "dense" in names


def test_demo_writes_videos_and_report(tmp_path):
    report = run_demo("knobs", tmp_path, {"strength": 0.25}, family="wan21", progress=False)
    assert set(report["runs"]) == {"dense", "knobs"}
    assert report["max_abs_diff_to_dense"] <= 1e-5  # knobs' "sparse" path is dense attention
    layout = report["runs"]["knobs"]["layout_seen"]["transformer"]
    assert layout["frames"] >= 1 and layout["height"] >= 8 and layout["width"] >= 8
    for run in report["runs"].values():
        out = tmp_path / run["output"].split("/")[-1]
        assert out.exists() and (out.is_dir() or out.stat().st_size > 0)
        assert run["seconds"] > 0 and run["patched"] > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == "knobs" and saved["options"] == {"strength": 0.25}


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
