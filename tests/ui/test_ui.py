"""`attnproc ui`: the gradio app driven by gradio_client and by a real headless Chromium (playwright)."""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import numpy as np
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.registry import REGISTRY
from pixels import assert_has_content, read_frames

gr = pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'attnproc[ui]')")
from gradio_client import Client  # noqa: E402

from attnproc.ui.app import build_app, widget_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class Banded(attnproc.Method):
    """Test method: dense attention that reports a banded sparsity pattern (for the mask picture)."""

    name = "banded"
    summary = "Test method: dense attention reporting a diagonal-band pattern."

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    def token_mask(self, site, q_len, k_len):
        i = torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        return ((i - j).abs() < 8)[None]


if "banded" not in REGISTRY.names():
    attnproc.register(Banded)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    demo = build_app(["tiny:sd15", "tiny:wan21"])
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(demo.renderer.out_dir)])
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app[1], verbose=False)


def test_widgets_follow_the_registry_schema():
    infos = {m.name: m for m in attnproc.methods()}
    knobs = {o.name: widget_spec(o) for o in infos["knobs"].options}
    assert knobs["strength"]["kind"] == "slider" and (knobs["strength"]["minimum"], knobs["strength"]["maximum"]) == (0, 1)
    assert knobs["width"] == {**knobs["width"], "kind": "slider", "minimum": 1, "maximum": 9, "step": 1}
    assert knobs["mode"] == {"kind": "dropdown", "choices": ["a", "b"], "value": "a"}
    assert knobs["dense_cross"]["kind"] == "checkbox"
    assert widget_spec(attnproc.options.OptionInfo("regions", "any", None))["kind"] == "json"


def test_automatic_options_show_automatic_not_a_number():
    """Options whose default is None (the family's value) must not show 0 / unchecked / the slider minimum."""
    infos = {m.name: {o.name: o for o in m.options} for m in attnproc.methods()}
    radial = {name: widget_spec(o) for name, o in infos["radial"].items()}
    assert radial["decay"] == {**radial["decay"], "kind": "number", "value": None, "automatic": True}
    assert radial["dense_first_layers"]["value"] is None and radial["dense_first_steps"]["value"] is None
    assert radial["sink"] == {"kind": "dropdown", "choices": ["automatic", "True", "False"], "value": "automatic"}
    assert radial["block_size"]["kind"] == "slider" and radial["block_size"]["value"] == 128
    gna = {name: widget_spec(o) for name, o in infos["gna"].items()}
    assert gna["min_tokens"]["kind"] == "number" and gna["dense_last_steps"]["kind"] == "number"  # 0-10,000
    assert {m: widget_spec(o)["kind"] for m, o in infos["maskmod"].items() if o.type == "float"} == dict.fromkeys(
        ["cross_weight", "self_weight", "time_power", "active_steps", "size_reg"], "slider")
    assert gna["dense_first_layers"]["kind"] == "number" and gna["dense_first_layers"]["value"] == 0
    from attnproc.ui.app import _widget_value

    assert _widget_value(infos["radial"]["sink"], "automatic") is None
    assert _widget_value(infos["radial"]["sink"], "False") is False
    assert _widget_value(infos["radial"]["decay"], None) is None
    assert _widget_value(infos["radial"]["decay"], "") is None and _widget_value(infos["radial"]["decay"], "0.5") == 0.5


def test_default_pipeline_is_one_the_method_serves():
    from attnproc.ui.app import Renderer, pipeline_choices

    renderer = Renderer()
    offered, value = pipeline_choices(renderer, "radial", ["tiny:sd15", "tiny:flux", "tiny:wan21"], "tiny:sd15")
    assert (offered, value) == (["tiny:wan21"], "tiny:wan21")
    assert pipeline_choices(renderer, "gna", ["tiny:sd15", "tiny:flux", "tiny:wan21"], "tiny:wan21") == (
        ["tiny:flux", "tiny:wan21"], "tiny:wan21")
    assert pipeline_choices(renderer, "dense", ["tiny:sd15", "tiny:wan21"], "tiny:sd15")[1] == "tiny:sd15"
    with pytest.raises(ValueError, match="method 'radial' cannot run on tiny:sd15"):
        renderer.generate("tiny:sd15", "radial", "a fox", steps=1)
    assert not renderer._pipes  # refused from the configuration, before any pipeline was loaded


def test_binds_localhost_and_exposes_endpoints(app, client):
    demo, url = app
    assert url.startswith("http://127.0.0.1:") and demo.server_name == "127.0.0.1"
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/generate_json"} <= set(endpoints)
    assert demo.config["components"]  # built from the registry
    labels = {c.get("props", {}).get("label") for c in demo.config["components"]}
    assert any(str(l).startswith("strength") for l in labels) and any(str(l).startswith("mode") for l in labels)


def test_generate_image_side_by_side_with_mask(client):
    res = client.predict("tiny:sd15", "banded", "a red fox", "", 1, 2, 64, 64, 0, True, "{}", 2,
                         api_name="/generate_json")
    assert res["kind"] == "image" and res["shape"] == [1, 64, 64, 3]
    assert set(res["outputs"]) == {"banded", "dense"} and all(Path(p).is_file() for p in res["outputs"].values())
    for p in res["outputs"].values():
        assert_has_content(read_frames(p))
    timing = res["timing"]  # the shared helper: warm-up, alternating rounds, median and range
    assert timing["banded"]["repeats"] == 2 and len(timing["dense"]["attention_s"]["runs"]) == 2
    assert timing["speedup"]["total"]["median"] > 0 and isinstance(timing["within_noise"], bool)
    diff = res["difference_to_dense"]
    assert diff["max_abs_diff"] == 0.0 and diff["psnr_db"] is None  # banded computes dense attention
    assert Path(res["mask"]).is_file() and res["mask_caption"].startswith("density ")
    # the button's endpoint: gallery (method | dense), hidden video players, mask picture, stats
    gallery, video, video_dense, mask, stats = client.predict(
        "tiny:sd15", "knobs", "a red fox", "", 0, 1, 64, 64, 0, True, 1, json.dumps({"strength": 0.3}), None, "",
        api_name="/generate")
    assert [g["caption"] for g in gallery] == ["knobs", "dense"]
    assert Path(mask).is_file() and stats["options"]["strength"] == 0.3 and "dense" in stats["timing"]


def test_generate_video(client):
    res = client.predict("tiny:wan21", "knobs", "waves", "", 0, 1, 64, 64, 5, False, "{}", 1,
                         api_name="/generate_json")
    assert res["kind"] == "video" and res["shape"][0] == 5 and set(res["outputs"]) == {"knobs"}
    frames = read_frames(res["outputs"]["knobs"])  # what the player shows: the rendered pixels, not white
    assert frames.shape[0] == 5
    assert_has_content(frames)


@pytest.mark.parametrize("method, options, message", [
    ("knobs", {"strength": 7}, "out of range"),
    ("knobs", {"nosuch": 1}, "unknown option"),
    ("nosuch", {}, "registered methods"),
    ("knobs", "{not json", "not valid JSON"),
])
def test_errors_reach_the_client(client, method, options, message):
    from gradio_client.exceptions import AppError

    text = options if isinstance(options, str) else json.dumps(options)
    with pytest.raises(AppError, match=message):
        client.predict("tiny:sd15", method, "a fox", "", 0, 1, 64, 64, 0, False, text, api_name="/generate_json")


def test_chromium_loads_page_generates_and_screenshots(app):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); CI installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    artifacts = Path(os.environ.get("ATTNPROC_ARTIFACTS", ROOT / "tests-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "ui.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app[1], wait_until="networkidle")
            method = page.get_by_label("method", exact=True)
            method.click()
            method.fill("banded")
            page.keyboard.press("Enter")
            page.get_by_text("reporting a diagonal-band pattern").wait_for(timeout=30_000)  # the summary follows
            page.get_by_label("prompt", exact=True).fill("a blue bird on a branch")
            page.locator("#generate").click()
            page.locator("#gallery img").nth(1).wait_for(timeout=90_000)
            page.locator("#stats").get_by_text("speedup").first.wait_for(timeout=30_000)
            page.locator("#stats").get_by_text("density").first.wait_for(timeout=10_000)
            assert page.locator("#gallery img").count() == 2
            assert page.locator("#mask img").count() == 1
            method.click()  # radial does not serve tiny:sd15: the pipeline follows the method
            method.fill("radial")
            page.keyboard.press("Enter")
            pipeline = page.get_by_label("pipeline", exact=True)
            page.wait_for_function("el => el.value === 'tiny:wan21'", arg=pipeline.element_handle(), timeout=30_000)
            automatic = page.locator("[placeholder='automatic']:visible")  # decay, dense_first_steps/_layers
            automatic.first.wait_for(timeout=30_000)
            assert automatic.count() == 3 and all(automatic.nth(i).input_value() == "" for i in range(3))
        finally:
            page.screenshot(path=str(shot), full_page=True)  # also on failure, to see why
            browser.close()
    print(f"\nUI screenshot saved: {shot}")
    assert shot.stat().st_size > 10_000


def test_regions_editor_layers_become_region_masks():
    from attnproc.ui.app import regions_from_editor

    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[:8, :8, 3] = 255
    empty = np.zeros((16, 16, 4), dtype=np.uint8)
    regions = regions_from_editor({"background": None, "layers": [layer, empty], "composite": None}, "a red fox\n")
    assert len(regions) == 1 and regions[0]["phrase"] == "a red fox"
    assert regions[0]["mask"].shape == (16, 16) and regions[0]["mask"].sum() == 64
    assert regions_from_editor({"layers": []}, "") is None
    with pytest.raises(ValueError, match="one phrase per line"):
        regions_from_editor({"layers": [layer]}, "")


def test_mask_picture_shows_the_methods_sparse_pattern():
    """Radial on Wan runs its first block dense by default; the picture must still show the sparse pattern."""
    from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
    from attnproc.ui.app import mask_picture

    pipe = tiny_pipeline("wan21")
    handle = attnproc.apply(pipe, "radial", block_size=32)
    pipe(**tiny_call_kwargs("wan21", output_type="latent"))
    picture, caption = mask_picture(handle)
    attnproc.remove(pipe)
    assert caption.startswith("density ") and float(caption.split()[1].rstrip(",;")) < 1.0, caption
    img = np.asarray(picture)
    assert img.shape[1] == 384 and img.shape[0] > 384  # the pattern, then its legend
    assert (img[:384] == 0).any() and (img[:384] == 255).any()


def test_isolate_story_through_the_ui(client):
    """isolate's subjects (boxes) and prompts go in the options box; the prompt is the scene, rendered in the batch
    [references, scene] and compared with dense on the same batch."""
    prompts = ["a red fox", "a blue bird", "a red fox and a blue bird"]
    options = {"prompts": prompts, "subjects": [
        {"phrase": "red fox", "box": [0, 0.25, 0.5, 0.75], "reference_box": [0.25, 0.25, 0.75, 0.75]},
        {"phrase": "blue bird", "box": [0.5, 0.25, 1, 0.75], "reference_box": [0.25, 0.25, 0.75, 0.75]}]}
    res = client.predict("tiny:sd15", "isolate", prompts[-1], "", 0, 2, 64, 64, 0, True, json.dumps(options), 1,
                         api_name="/generate_json")
    assert res["shape"] == [1, 64, 64, 3] and set(res["outputs"]) == {"isolate", "dense"}
    assert res["options"]["subjects"][1]["phrase"] == "blue bird"
    assert res["difference_to_dense"]["max_abs_diff"] > 0
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="must be the job's prompt"):
        client.predict("tiny:sd15", "isolate", "a fox", "", 0, 1, 64, 64, 0, False, json.dumps(options), 1,
                       api_name="/generate_json")


def test_concept_pickers_write_files_and_beta_per_concept_into_the_options(app, client, tmp_path):
    """keylock's pickers: concept files, one β per file (empty = the file's own) and the covariance file become
    the options the renderer gets; a β list that does not match the files is refused by name."""
    from attnproc.pipelines import concepts as cc
    from attnproc.pipelines import tiny_pipeline
    from attnproc.ui.app import concept_options

    labels = {str(c.get("props", {}).get("label")) for c in app[0].config["components"]}
    assert {"concept files (attnproc train-concept)", "covariance file (attnproc keylock-covariance)"} <= labels
    pipe = tiny_pipeline("sd15")
    paths = []
    for token, word in (("<flag>", "fox"), ("<dot>", "snow")):
        con = cc.initial_concept(pipe, token, word, ["a {}"])
        for t in con.values.values():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(len(paths))))
        paths.append(str(cc.save_concept(con, tmp_path / f"{word}.safetensors")))
    cov = str(cc.save_covariance(cc.estimate_covariance(pipe, ["a red fox", "snow"]), tmp_path / "C.safetensors",
                                 text_encoder=cc.text_fingerprint(pipe), captions=2, ridge=1e-3))
    text = concept_options(paths, "0.6,", cov, json.dumps({"multi": "approx"}))
    opts = json.loads(text)
    assert opts == {"multi": "approx", "concepts": [{"file": paths[0], "beta": 0.6}, {"file": paths[1]}],
                    "covariance": cov}
    with pytest.raises(ValueError, match=r"β per concept: 3 value\(s\) for 2 concept file\(s\)"):
        concept_options(paths, "0.6, 0.7, 0.8", cov, "{}")
    with pytest.raises(ValueError, match="'high' .* is not a number"):
        concept_options(paths, "high, 0.7", cov, "{}")
    images = {}
    for beta in ("0.6, 0.7", "1.2, 0.7"):
        res = client.predict("tiny:sd15", "keylock", "a <flag> and a <dot>", "", 0, 2, 64, 64, 0, False,
                             concept_options(paths, beta, cov, "{}"), 1, api_name="/generate_json")
        assert res["options"]["concepts"][1] == {"file": paths[1], "beta": 0.7}
        images[beta] = read_frames(res["outputs"]["keylock"]).astype(np.float64)
    assert np.abs(images["0.6, 0.7"] - images["1.2, 0.7"]).max() > 1  # the picked β reached the edit
