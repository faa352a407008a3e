"""`attnproc export-comfy`: the node pack, its generated widgets, and the attention override against stand-ins
shaped like ComfyUI (q, k, v as [B, S, H*D] or [B, H, S, D], a transformer_options dict, a ModelPatcher)."""
import copy
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.registry import REGISTRY
from attnproc.workflows.comfy import comfy_servable
from attnproc.workflows.comfy_steer import STEER_NODES
from attnproc.workflows.cli import main
from attnproc.workflows.comfy import export_comfy, node_id
from attnproc.workflows.comfy_runtime import OVERRIDE_KEY, layout_from, make_override, patch_model, step_from


# ----------------------------------------------------------------------------- ComfyUI-shaped stand-ins
def comfy_sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):
    """Dense attention with ComfyUI's calling convention."""
    if not skip_reshape:
        b, s, hd = q.shape
        q, k, v = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def with_override_dispatch(fn):
    """ComfyUI's attention functions consult transformer_options' override once per call (not when re-entered)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("_inside_attn_wrapper"):
            return fn(*args, **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        opts = kwargs.get("transformer_options") or {}
        if OVERRIDE_KEY in opts:
            return opts[OVERRIDE_KEY](fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


attention = with_override_dispatch(comfy_sdpa)


class WAN21:
    """Stands in for comfy.model_base.WAN21 (only the class name matters)."""


class ModelPatcher:
    def __init__(self, model_options=None, model=None):
        self.model_options = model_options or {"transformer_options": {}}
        self.model = model

    def clone(self):
        return ModelPatcher(copy.copy(self.model_options), self.model)


def options(block=3, step=1, steps=4, layout=None, **extra):
    sample_sigmas = torch.linspace(14.6, 0.0, steps + 1)
    opts = {"block_index": block, "sigmas": sample_sigmas[step:step + 1], "sample_sigmas": sample_sigmas,
            "cond_or_uncond": [1, 0], **extra}
    if layout is not None:
        opts["attnproc_layout"] = layout
    return opts


def qkv(b=2, s=64, heads=2, d=8, kv_len=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, heads * d, generator=g)
    k = torch.randn(b, kv_len or s, heads * d, generator=g)
    v = torch.randn(b, kv_len or s, heads * d, generator=g)
    return q, k, v


def bhsd(t, heads):
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def creatable_methods():
    names = []
    for name in REGISTRY.names():
        if not comfy_servable(REGISTRY.get(name)):
            continue  # refused in ComfyUI (test_methods_needing_more_than_qkv_are_refused)
        try:
            REGISTRY.create(name)
        except Exception:  # a method whose defaults need user input (e.g. regions) is tested with inputs elsewhere
            continue
        names.append(name)
    return names


# ----------------------------------------------------------------------------- the override
def _never_called(original, *args, **kwargs):
    raise AssertionError("the node handed a call it should serve to the previous override")


@pytest.mark.parametrize("method", creatable_methods())
def test_node_override_equals_attnproc_method(method):
    layout = attnproc.TokenLayout(2, 8, 8)
    q, k, v = qkv(s=layout.visual_len)
    base = ModelPatcher({"transformer_options": {OVERRIDE_KEY: _never_called}}, model=WAN21())
    model = patch_model(base, method)
    opts = {**model.model_options["transformer_options"], **options()}
    # the same method, called directly with [B, H, S, D] tensors and the site ComfyUI's options describe
    site = attnproc.Site("wan", "diffusion_model", None, 3, 3, "self", layout, step_from(opts))
    ref = REGISTRY.create(method).attention(bhsd(q, 2), bhsd(k, 2), bhsd(v, 2), site)
    opts["attnproc_layout"] = layout
    out = attention(q, k, v, 2, transformer_options=opts)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(out.shape))
    # ComfyUI's [B, H, S, D] variants
    out4 = attention(bhsd(q, 2), bhsd(k, 2), bhsd(v, 2), 2, skip_reshape=True, skip_output_reshape=True,
                     transformer_options=opts)
    torch.testing.assert_close(out4, ref)


def test_site_step_layer_and_sparse_path_served():
    layout = attnproc.TokenLayout(1, 8, 8)
    model = patch_model(ModelPatcher(model=WAN21()), "knobs", strength=0.3, mode="b", width=5)
    override = model.model_options["transformer_options"][OVERRIDE_KEY]
    knobs = override.attnproc_method
    assert knobs.config.strength == 0.3 and knobs.config.mode == "b" and knobs.config.width == 5
    q, k, v = qkv()
    attention(q, k, v, 2, transformer_options={**model.model_options["transformer_options"],
                                               **options(block=5, step=2, steps=4, layout=layout)})
    assert knobs.sparse_calls == 1  # served by the method, not the fallback
    step = step_from(options(step=2, steps=4))
    assert (step.index, step.num_steps, step.branch) == (2, 4, "batched")
    assert step_from(options(step=0, steps=4, cond_or_uncond=[0])).branch == "cond"
    probe = make_override(REGISTRY.create("probe"))
    attention(q, k, v, 2, transformer_options={**options(block=7, step=3, layout=layout), OVERRIDE_KEY: probe})
    site = probe.attnproc_method.sites[-1]
    assert (site.layer, site.step.index, site.layout, site.kind) == (7, 3, layout, "self")


def test_layout_from_comfy_shapes():
    """What ComfyUI really passes (checked against the engine in test_comfy_engine.py): Wan's post-patch
    grid_sizes, the UNet SpatialTransformer's activations_shape; original_shape (the UNet's input latent) alone is
    not the grid of any attention call."""
    assert layout_from({"activations_shape": [2, 320, 8, 8]}, 64) == attnproc.TokenLayout(1, 8, 8)
    assert layout_from({"grid_sizes": (3, 8, 8), "cond_or_uncond": [1, 0]}, 3 * 64) == \
        attnproc.TokenLayout(3, 8, 8, branches=("uncond", "cond"))
    assert layout_from({"grid_sizes": (3, 8, 8)}, 3 * 64, 12) == \
        attnproc.TokenLayout(3, 8, 8, text_len=12, text_position="separate")  # cross-attention
    assert layout_from({"grid_sizes": (3, 8, 8)}, 3 * 64 + 257) is None  # extra (reference-image) tokens
    assert layout_from({"original_shape": [1, 16, 3, 16, 16]}, 3 * 64) is None
    assert layout_from({}, 64) is None


def test_layout_from_the_latent_for_joint_families():
    """Flux/SD3/HunyuanVideo/Qwen-Image/LTX: the grid is the latent's (from attnproc's apply_model wrapper) over
    the patch size; text sits before the image, as ComfyUI's model code concatenates it; a length the latent and
    text do not account for (Kontext reference latents) gives no layout."""
    from attnproc.workflows.comfy_runtime import LATENT_KEY, layer_from

    flux = {LATENT_KEY: {"shape": (2, 16, 11, 12), "text_len": 7, "patch": 2, "double_blocks": 19},
            "cond_or_uncond": [1, 0]}
    joint = attnproc.TokenLayout(1, 6, 6, text_len=7, text_position="before", branches=("uncond", "cond"))
    assert layout_from(flux, 7 + 36, family="flux") == joint  # odd height padded to the patch, as ComfyUI does
    assert layout_from(flux, 7 + 36 + 36, family="flux") is None  # reference latents appended to the image
    assert layout_from({**flux, "img_slice": [7, 43]}, 43, family="flux") == joint
    assert layout_from(flux, 7, family="flux") is None  # a text-only call
    assert layer_from({**flux, "block_index": 2, "block_type": "single"}) == 21
    assert layer_from({**flux, "block_index": 2, "block_type": "double"}) == 2
    hunyuan = {LATENT_KEY: {"shape": (1, 16, 5, 16, 16), "text_len": 9, "patch": (1, 2, 2)}}
    assert layout_from(hunyuan, 9 + 320, family="hunyuanvideo") == \
        attnproc.TokenLayout(5, 8, 8, text_len=9, text_position="before")
    ltx = {LATENT_KEY: {"shape": (1, 128, 3, 4, 6), "text_len": 12, "patch": None}}
    assert layout_from(ltx, 72, family="ltx") == attnproc.TokenLayout(3, 4, 6)
    assert layout_from(ltx, 72, 12, family="ltx") == \
        attnproc.TokenLayout(3, 4, 6, text_len=12, text_position="separate")
    assert layout_from(flux, 43, family=None) is None  # a family without a known token order


def test_fallbacks_chain_to_previous_override():
    calls = []

    def previous(original, *args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    base = ModelPatcher({"transformer_options": {OVERRIDE_KEY: previous, "other": 1}}, model=WAN21())
    model = patch_model(base, "knobs")
    opts = model.model_options["transformer_options"]
    assert base.model_options["transformer_options"][OVERRIDE_KEY] is previous  # the input MODEL is untouched
    assert opts["other"] == 1 and opts[OVERRIDE_KEY].attnproc_previous is previous
    knobs = opts[OVERRIDE_KEY].attnproc_method
    q, k, v = qkv(kv_len=12)  # cross-attention → previous (then dense)
    out = attention(q, k, v, 2, transformer_options={**opts, **options()})
    torch.testing.assert_close(out, comfy_sdpa(q, k, v, 2))
    q, k, v = qkv()  # self-attention without a layout: knobs needs one → previous
    attention(q, k, v, 2, transformer_options={**opts, **options()})
    mask = torch.zeros(64, 64)  # masked calls → previous
    attention(q, k, v, 2, mask=mask, transformer_options={**opts, **options(layout=attnproc.TokenLayout(1, 8, 8))})
    assert len(calls) == 3 and knobs.sparse_calls == 0
    # two attnproc nodes in a row compose into one method (dense then knobs: knobs), the chain before them kept
    twice = patch_model(patch_model(base, "dense"), "knobs")
    override = twice.model_options["transformer_options"][OVERRIDE_KEY]
    assert override.attnproc_method.base.name == "knobs" and override.attnproc_previous is previous
    with pytest.raises(ValueError, match="two base attention methods chained"):
        patch_model(patch_model(base, "knobs"), "knobs")


def test_bad_widget_values_raise_named_errors():
    with pytest.raises(attnproc.OptionError, match="strength"):
        patch_model(ModelPatcher(model=WAN21()), "knobs", strength=3.0)


# ----------------------------------------------------------------------------- the exported pack
def _load_pack(path, name):
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fake_comfy_api():
    """A minimal `comfy_api.latest` (ComfyUI's V3 node API) recording what the pack declares."""
    io = types.SimpleNamespace()

    class _Input:
        def __init__(self, id, **kw):
            self.id, self.kw = id, kw

    def kind(name):
        return type(name, (), {"Input": type("Input", (_Input,), {"kind": name.upper()}),
                               "Output": type("Output", (), {"__init__": lambda self, *a, **k: None})})

    for name in ("Model", "Float", "Int", "Boolean", "Combo", "String", "Clip", "Mask"):
        setattr(io, name, kind(name))
    io.Custom = lambda type_name: kind(type_name)
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.NodeOutput = lambda *values: types.SimpleNamespace(values=values)
    io.ComfyNode = type("ComfyNode", (), {})
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    root = types.ModuleType("comfy_api")
    root.latest = latest
    return {"comfy_api": root, "comfy_api.latest": latest}


def test_export_pack_v1_and_v3(tmp_path, monkeypatch):
    pack = export_comfy(tmp_path / "attnproc_nodes")
    files = {p.relative_to(pack).as_posix() for p in pack.rglob("*") if p.is_file()}
    names = [n for n in REGISTRY.names() if comfy_servable(REGISTRY.get(n)) or n in STEER_NODES]
    assert "agent" not in names and {"dense", "radial", "vmoba"} <= set(names)
    assert {"__init__.py", "nodes.py", "nodes.json", "pyproject.toml", "README.md"} <= files
    for n in names:
        ui = json.loads((pack / "example_workflows" / f"attnproc_{n}.json").read_text())
        api = json.loads((pack / "example_workflows_api" / f"attnproc_{n}_api.json").read_text())
        assert any(node["type"] == node_id(n) for node in ui["nodes"]) and ui["links"]
        assert api["2"]["class_type"] == node_id(n) and api["6"]["inputs"]["model"] == ["2", 0]
        # every example runs on Wan, which every override method serves; the steering edits' on SD 1.5
        assert api["1"]["class_type"] == ("CheckpointLoaderSimple" if n in STEER_NODES else "UNETLoader")
        # the UI format carries the same graph: one link per API socket connection
        assert len(ui["links"]) == sum(isinstance(v, list) for node in api.values() for v in node["inputs"].values())
    pyproject = (pack / "pyproject.toml").read_text()
    assert "[tool.comfy]" in pyproject and "dependencies = []" in pyproject  # attnproc is not on PyPI
    manifest = json.loads((pack / "nodes.json").read_text())
    assert manifest["attnproc_version"] == attnproc.__version__ and "python -m build" in manifest["install"]
    assert "python -m build" in (pack / "README.md").read_text()
    # V1 (no comfy_api): mappings with widgets from the registry schema
    v1 = _load_pack(pack, "attnproc_pack_v1")
    node_ids = {node_id(n) for n in names} | ({"AttnProcRegion"} if "maskmod" in names else set()) | \
        ({"AttnProcConceptClip", "AttnProcConceptEncode"} if "keylock" in names else set())
    assert not hasattr(v1, "comfy_entrypoint") and set(v1.NODE_CLASS_MAPPINGS) == node_ids
    req = v1.NODE_CLASS_MAPPINGS["AttnProcKnobs"].INPUT_TYPES()["required"]
    assert req["model"] == ("MODEL",)
    assert req["strength"][0] == "FLOAT" and (req["strength"][1]["min"], req["strength"][1]["max"]) == (0.0, 1.0)
    assert req["width"][0] == "INT" and (req["width"][1]["min"], req["width"][1]["max"]) == (1, 9)
    assert req["mode"][0] == ["a", "b"] and req["dense_cross"][0] == "BOOLEAN"
    node = v1.NODE_CLASS_MAPPINGS["AttnProcKnobs"]()
    (patched,) = getattr(node, node.FUNCTION)(model=ModelPatcher(model=WAN21()), strength=0.1, mode="a", width=3, dense_first_steps=0.0,
                                              dense_last_steps=0.0, dense_first_layers=0, dense_cross=True,
                                              min_tokens=0)
    assert patched.model_options["transformer_options"][OVERRIDE_KEY].attnproc_method.config.strength == 0.1
    # V3 (comfy_api.latest present): comfy_entrypoint only, V1 mappings not exported (ComfyUI would prefer them)
    for k, mod in _fake_comfy_api().items():
        monkeypatch.setitem(sys.modules, k, mod)
    v3 = _load_pack(pack, "attnproc_pack_v3")
    assert not hasattr(v3, "NODE_CLASS_MAPPINGS")
    import asyncio

    nodes = asyncio.run(asyncio.run(v3.comfy_entrypoint()).get_node_list())
    schemas = {n.define_schema().node_id: n for n in nodes}
    assert set(schemas) == node_ids
    schema = schemas["AttnProcKnobs"].define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["model"].kind == "MODEL" and inputs["strength"].kind == "FLOAT"
    assert inputs["strength"].kw["min"] == 0.0 and inputs["mode"].kw["options"] == ["a", "b"]
    result = schemas["AttnProcKnobs"].execute(model=ModelPatcher(model=WAN21()), strength=0.2)
    assert result.values[0].model_options["transformer_options"][OVERRIDE_KEY].attnproc_method.config.strength == 0.2


def _comfy_cli():
    return os.environ.get("ATTNPROC_COMFY_CLI") or shutil.which("comfy")


@pytest.mark.skipif(not _comfy_cli(), reason="comfy-cli not installed (pip install comfy-cli; CI installs it)")
def test_exported_pack_passes_comfy_node_validate(tmp_path):
    assert main(["export-comfy", str(tmp_path / "pack")]) == 0
    assert main(["export-comfy", str(tmp_path / "pack")]) == 2  # refuses to overwrite without --force
    assert main(["export-comfy", str(tmp_path / "pack"), "--force"]) == 0
    proc = subprocess.run([_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                          cwd=tmp_path / "pack", capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "All validation checks passed" in text and "warning" not in text.lower()


def test_family_from_comfy_model_classes():
    from attnproc.workflows.comfy_runtime import family_from

    class WAN22(WAN21):
        pass

    class BaseModel:
        pass

    class CosmosVideo(BaseModel):
        pass

    assert family_from(ModelPatcher(model=WAN22())) == "wan"
    assert family_from(ModelPatcher(model=BaseModel())) == "unet"
    assert family_from(ModelPatcher(model=CosmosVideo())) is None  # unknown models are not guessed
    assert family_from(ModelPatcher()) is None


def test_unsupported_model_refused_when_the_node_executes():
    layout_model = ModelPatcher(model=type("CosmosVideo", (), {})())  # a family attnproc has no grid for
    with pytest.raises(ValueError, match="needs the token grid, which attnproc reads in ComfyUI only for"):
        patch_model(layout_model, "knobs")
    with pytest.raises(ValueError, match="method 'radial' does not support the model family None"):
        patch_model(ModelPatcher(), "radial")


def test_tristate_and_float_widgets_follow_the_library_defaults():
    from attnproc.workflows.comfy import node_specs
    from attnproc.workflows.comfy_runtime import parse_widget_options

    radial = {w["name"]: w for w in node_specs(["radial"])[0]["widgets"]}
    assert radial["sink"]["kind"] == "COMBO" and radial["sink"]["default"] == "auto"
    assert radial["sink"]["options"] == ["auto", "on", "off"]
    assert parse_widget_options("radial", {"sink": "auto"}) == {}  # None: the family's (Wan: on)
    assert parse_widget_options("radial", {"sink": "off"}) == {"sink": False}
    with pytest.raises(ValueError, match="'sink' of method 'radial': choose one of auto, on, off"):
        parse_widget_options("radial", {"sink": "maybe"})
    knobs = {w["name"]: w for w in node_specs(["knobs"])[0]["widgets"]}
    assert knobs["strength"]["step"] == 0.01


def test_scale_and_gqa_reach_the_method():
    layout = attnproc.TokenLayout(1, 8, 8)
    probe = make_override(REGISTRY.create("probe"))
    q, k, v = qkv(heads=4)
    kv = bhsd(k, 4)[:, :2], bhsd(v, 4)[:, :2]  # 2 key/value heads for 4 query heads
    opts = {**options(layout=layout), OVERRIDE_KEY: probe}
    out = attention(bhsd(q, 4), *kv, 4, skip_reshape=True, skip_output_reshape=True, enable_gqa=True, scale=0.3,
                    transformer_options=opts)
    ref = torch.nn.functional.scaled_dot_product_attention(bhsd(q, 4), *kv, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref)


_LOAD_PACK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
"""


def test_pack_imports_without_diffusers_and_checks_attnproc(tmp_path):
    pack = export_comfy(tmp_path / "attnproc_nodes")
    code = _LOAD_PACK + """
import types, torch
from attnproc.workflows.comfy_runtime import patch_model
class WAN21: pass
class Patcher:
    def __init__(self): self.model_options, self.model = {"transformer_options": {}}, WAN21()
    def clone(self): return self
node = pack.NODE_CLASS_MAPPINGS["AttnProcRadial"]()
node.patch(model=Patcher(), sink="off")
print(sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers", "gradio"}))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(pack)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    # attnproc missing from ComfyUI's Python: loading the pack says how to install it
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['attnproc'] = None\n" + _LOAD_PACK,
                           str(pack)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "the attnproc node pack needs the attnproc package in ComfyUI's Python" in proc.stderr
    assert "python -m build" in proc.stderr and "not on PyPI" in proc.stderr


def test_region_nodes_chain_and_check_their_inputs():
    from attnproc.workflows.comfy_runtime import add_region, patch_maskmod

    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1
    first = add_region(None, " a red fox ", mask)
    both = add_region(first, "the snow", 1 - mask)
    assert [r["phrase"] for r in both] == ["a red fox", "the snow"] and len(first) == 1  # input list unchanged
    assert both[0]["mask"].shape == (16, 16)  # one MASK for every frame
    assert add_region(None, "fox", torch.zeros(3, 8, 8))[0]["mask"].shape == (3, 8, 8)  # one per frame
    with pytest.raises(ValueError, match="region phrase: give a part of the prompt"):
        add_region(None, "  ", mask)
    with pytest.raises(ValueError, match=r"region mask: a ComfyUI MASK \[B, H, W\] is expected"):
        add_region(None, "fox", torch.zeros(8))
    with pytest.raises(ValueError, match="maskmod: connect at least one region"):
        patch_maskmod(ModelPatcher(model=WAN21()), None, "a red fox", [])
    # a family whose text context mixes encoders: refused, not bound to the wrong tokens
    with pytest.raises(ValueError, match=r"maskmod in ComfyUI binds phrases for the families .*family 'sd3'"):
        patch_maskmod(ModelPatcher(model=type("SD3", (), {})()), None, "a red fox", first)


def test_maskmod_binds_flux_phrases_with_the_t5_tokens():
    """Flux's text context is T5's: the phrase positions come from the 't5xxl' tokenizer of the CLIP input."""
    from attnproc.workflows.comfy_runtime import phrase_tokens

    class DualClip:  # ComfyUI's clip.tokenize(..., return_word_ids=True): {key: [[(token, weight, word_id)]]}
        def tokenize(self, text, return_word_ids=True):
            words = text.split()
            l_tokens = [(49406, 1.0, 0)] + [(100 + len(w), 1.0, i + 1) for i, w in enumerate(words)]
            t5 = [(200 + len(w), 1.0, i + 1) for i, w in enumerate(words)] + [(1, 1.0, 0)]
            return {"l": [l_tokens], "t5xxl": [t5]}

    assert phrase_tokens(DualClip(), "a red fox", "red fox", "t5xxl") == [1, 2]  # no start token in T5
    assert phrase_tokens(DualClip(), "a red fox", "red fox") == [2, 3]  # CLIP-L: after the start token
    with pytest.raises(ValueError, match="comes from the 'umt5xxl' tokenizer, which the CLIP input does not have"):
        phrase_tokens(DualClip(), "a red fox", "red fox", "umt5xxl")


def test_old_comfyui_without_the_override_hook_is_refused(tmp_path, monkeypatch):
    pack = _load_pack(export_comfy(tmp_path / "attnproc_nodes"), "attnproc_pack_old")
    attention_module = types.ModuleType("comfy.ldm.modules.attention")  # ComfyUI < 0.3.59: no wrap_attn
    for name in ("comfy", "comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", attention_module)
    node = pack.NODE_CLASS_MAPPINGS["AttnProcDense"]()
    with pytest.raises(RuntimeError, match=r"no optimized_attention_override \(added in ComfyUI 0.3.59"):
        node.patch(model=ModelPatcher(model=WAN21()))


def test_methods_needing_more_than_qkv_are_refused():
    """agent needs the block input; ComfyUI's override sees only q, k, v: no node in the pack, a clear error if
    asked for one, and one clear error if the runtime is given it anyway."""
    from attnproc.workflows.comfy import node_specs

    assert "agent" not in {s["method"] for s in node_specs()}
    with pytest.raises(ValueError, match="'agent' needs per-module state or the transformer block's input"):
        node_specs(["agent"])
    model = ModelPatcher(model=type("BaseModel", (), {})())
    with pytest.raises(ValueError, match="method 'agent' needs per-module state or the transformer block's input"):
        patch_model(model, "agent")


def test_a_positional_mask_is_never_served_as_unmasked():
    # Qwen-Image calls optimized_attention_masked(q, k, v, heads, mask, transformer_options=...)
    calls = []

    def previous(original, *args, **kwargs):
        calls.append(len(args))
        return original(*args, **kwargs)

    model = patch_model(ModelPatcher({"transformer_options": {OVERRIDE_KEY: previous}}, model=WAN21()), "knobs")
    opts = model.model_options["transformer_options"]
    q, k, v = qkv()
    mask = torch.zeros(64, 64)
    mask[:, 32:] = -torch.inf
    out = attention(q, k, v, 2, mask, transformer_options={**opts, **options(layout=attnproc.TokenLayout(1, 8, 8))})
    assert calls == [5] and opts[OVERRIDE_KEY].attnproc_method.sparse_calls == 0
    torch.testing.assert_close(out, comfy_sdpa(q, k, v, 2, mask=mask))


def _simple_schedule(steps: int, shift: float = 3.0):
    """ComfyUI's `simple` scheduler on a flow model (ModelSamplingDiscreteFlow): sigma_i = shift(1 - m/1000),
    m = int(i * 1000 / steps), then 0; and the model's percent_to_sigma."""
    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    sigmas = [shifted(1 - int(i * 1000 / steps) / 1000) for i in range(steps)] + [0.0]
    return sigmas, types.SimpleNamespace(percent_to_sigma=lambda p: shifted(1 - p), timestep=lambda s: s * 1000)


@pytest.mark.parametrize("steps,split", [(4, 2), (20, 7), (30, 27)])
def test_schedule_span_places_a_ksampler_advanced_slice_in_the_whole_schedule(steps, split):
    from attnproc.workflows.comfy_runtime import schedule_span, sigma_percent

    sigmas, sampling = _simple_schedule(steps)
    percent = sigma_percent(sampling)
    assert schedule_span(sigmas, percent) == (0, steps)  # the whole schedule
    assert schedule_span(sigmas[:split + 1], percent) == (0, steps)  # first sampler, leftover noise kept
    forced = sigmas[:split] + [0.0]  # its end forced to 0 (return_with_leftover_noise off): known from 3 sigmas on
    assert schedule_span(forced, percent) == ((0, steps) if split >= 3 else None)
    assert schedule_span(sigmas[split:], percent) == (split, steps)  # second sampler
    assert schedule_span(sigmas[-2:], percent) is None  # two sigmas fit any spacing: not knowable
    karras = [14.6 * 0.4 ** i for i in range(steps)] + [0.0]  # not evenly spaced in percent: not knowable
    assert schedule_span(karras[split:], percent) is None and schedule_span(karras[:split + 1], percent) is None


def test_step_from_a_second_sampler_counts_in_the_whole_schedule():
    sigmas, sampling = _simple_schedule(8)
    from attnproc.workflows.comfy_runtime import sigma_percent

    restarts = []
    opts = {"sigmas": torch.tensor([sigmas[5]]), "sample_sigmas": torch.tensor(sigmas[4:])}
    step = step_from(opts, sampling, sigma_percent(sampling), lambda: restarts.append(1))
    assert (step.index, step.num_steps) == (5, 8) and not restarts
    step = step_from(opts, sampling)  # without the model's percent: the slice's own count
    assert (step.index, step.num_steps) == (1, 4)


def _ltx_calls(calls, caplog):
    """Run ``calls`` ((q_len, k_len, masked) each) through a fresh knobs node on an LTX model: (served, warnings)."""
    from attnproc.workflows.comfy_runtime import LATENT_KEY

    class LTXV:
        pass

    opts = patch_model(ModelPatcher({}, model=LTXV()), "knobs").model_options["transformer_options"]
    ltx = {LATENT_KEY: {"shape": (1, 128, 1, 8, 8), "text_len": 9, "patch": None, "calls": {"self": -1}}}
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnproc.comfy"):
        for q_len, k_len, masked in calls:
            q, k, v = qkv(s=q_len, kv_len=k_len)
            mask = torch.zeros(q_len, k_len) if masked else None
            out = attention(q, k, v, 2, mask, transformer_options={**opts, **ltx})
            if (q_len, k_len) != (64, 64):  # handed on: ComfyUI's attention
                torch.testing.assert_close(out, comfy_sdpa(q, k, v, 2, mask=mask))
    return opts[OVERRIDE_KEY].attnproc_method.sparse_calls, [r.getMessage() for r in caplog.records]


def test_ltx_self_attention_the_latent_does_not_account_for_warns_once(caplog):
    # the grid (64 tokens) is served; the text cross-attention (9 keys) is handed on without a word
    assert _ltx_calls([(64, 64, False), (64, 9, True), (64, 9, False)], caplog) == (1, [])
    expected = ["attnproc knobs: {} query tokens that the ltx model's latent and text do not account for "
                "(reference latents, added text tokens, or LTX keyframe guides); such calls run ComfyUI's attention"]
    # keyframe guides appended or filtered (grid_mask): another length than the latent's
    assert _ltx_calls([(60, 60, False)] * 3, caplog) == (0, [expected[0].format(60)])
    # guide attenuation: the self-attention split by query group (masked, then unmasked), keys all video tokens
    assert _ltx_calls([(20, 64, True), (30, 64, True), (14, 64, False)] * 2, caplog) == (0, [expected[0].format(20)])
