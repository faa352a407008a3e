"""``attnproc export-comfy DIR``: write a ComfyUI custom-node pack with one node per registered method.

The pack (see :func:`export_comfy`) holds the registry's option schema as data, generates its node classes from
it (V3 ``io.ComfyNode`` through ``comfy_entrypoint`` when ComfyUI has ``comfy_api.latest``, V1
``NODE_CLASS_MAPPINGS`` otherwise: ComfyUI's loader takes V1 mappings first and would then never call the
entrypoint, so the pack exports exactly one of the two), and runs each method through the installed ``attnproc``
(``attnproc.workflows.comfy_runtime.patch_model``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import attnproc
from attnproc.options import OptionInfo
from attnproc.workflows.comfy_runtime import comfy_unservable
from attnproc.workflows.comfy_steer import STEER_NODES, example_graph, steer_specs

PACK_NAME = "attnproc-nodes"
CATEGORY = "attnproc"
FALLBACK_NOTE = ("Masked calls (and cross-attention, unless the method edits it) run the attention installed before "
                 "this node (another override, or ComfyUI's own). Chained attnproc nodes compose: one base method "
                 "plus edits. An override node placed after this one (Sage, KJ patches) replaces it.")
LAYOUT_NOTE = ("Needs the token grid, which ComfyUI passes for Wan (grid_sizes) and SD1.x/SDXL UNets "
               "(activations_shape); on other models the node refuses to run.")
FLOAT_STEP = 0.01  # fine enough for every fractional option (dense step fractions, weights)


def node_id(method: str) -> str:
    return "AttnProc" + "".join(part.capitalize() for part in method.replace("-", "_").split("_"))


def widget(info: OptionInfo) -> dict:
    """One option as a ComfyUI widget: ``{"name", "kind": INT|FLOAT|BOOLEAN|COMBO|STRING, ...}``, with the
    library's default (a boolean whose default is the model family's is a tri-state ``auto``/``on``/``off``)."""
    w = {"name": info.name, "tooltip": info.help or info.describe_range()}
    if info.choices is not None:
        if info.default is None:  # automatic: chosen per family or from another option
            return {**w, "kind": "COMBO", "options": ["auto", *(str(c) for c in info.choices)], "default": "auto",
                    "tooltip": w["tooltip"] + " (auto = chosen by the method)"}
        return {**w, "kind": "COMBO", "options": [str(c) for c in info.choices], "default": str(info.default)}
    if info.type == "bool":
        if info.default is None:
            return {**w, "kind": "COMBO", "options": ["auto", "on", "off"], "default": "auto",
                    "tooltip": w["tooltip"] + " (auto = the model family's default)"}
        return {**w, "kind": "BOOLEAN", "default": bool(info.default)}
    if info.type in ("int", "float") and info.default is not None:
        lo = info.low if info.low is not None else (-2 ** 31 if info.type == "int" else -1e9)
        hi = info.high if info.high is not None else (2 ** 31 - 1 if info.type == "int" else 1e9)
        if info.type == "int":
            return {**w, "kind": "INT", "default": int(info.default), "min": int(lo), "max": int(hi), "step": 1}
        return {**w, "kind": "FLOAT", "default": float(info.default), "min": float(lo), "max": float(hi),
                "step": FLOAT_STEP}
    if info.type == "str":
        return {**w, "kind": "STRING", "default": info.default or "", "multiline": False}
    # "any", and numbers whose default is "automatic" (None): JSON text, empty = the default
    default = "" if info.default is None else json.dumps(info.default, default=str)
    return {**w, "kind": "STRING", "default": default, "multiline": info.type == "any", "json": True,
            "tooltip": (info.help + " " if info.help else "") + "(JSON; empty = default)"}


def comfy_servable(cls) -> bool:
    """Whether a method runs from ComfyUI's attention override (:func:`comfy_runtime.comfy_unservable`)."""
    return comfy_unservable(cls) is None


def node_specs(methods: list[str] | None = None) -> list[dict]:
    infos = attnproc.methods()
    if methods is not None:
        unknown = sorted(set(methods) - {m.name for m in infos})
        if unknown:
            raise attnproc.UnknownMethodError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered "
                                              f"methods: {', '.join(m.name for m in infos)}")
        infos = [m for m in infos if m.name in methods]
    specs = []
    for info in infos:
        cls = attnproc.registry.REGISTRY.get(info.name)
        if info.name in STEER_NODES:  # edits served through ComfyUI's attn2 patches (comfy_steer.py)
            specs.extend(steer_specs(info.name, [widget(o) for o in info.options]))
            continue
        if not comfy_servable(cls):
            if methods is not None:
                raise ValueError(f"method {info.name!r} {comfy_unservable(cls)}; it has no node (use it from "
                                 "Python, job files or the UI)")
            continue  # e.g. agent: no node rather than one that always refuses
        description = f"{info.summary} {FALLBACK_NOTE}" + (f" {LAYOUT_NOTE}" if cls.needs_layout else "")
        extra = EXTRA_SOCKETS.get(info.name, [])
        taken = {s["name"] for s in extra}
        widgets = [widget(o) for o in info.options if o.name not in taken]
        for w in widgets:
            if w["name"] in MULTILINE:
                w["multiline"] = True
        specs.append({"method": info.name, "node_id": node_id(info.name), "display_name": f"attnproc: {info.name}",
                      "description": description, "sockets": [{"name": "model", "type": "MODEL"}, *extra],
                      "widgets": widgets, "output": "MODEL", "run": "maskmod" if info.name == "maskmod" else "patch"})
        if info.name == "maskmod":
            specs.append(REGION_NODE)
    return specs


# Inputs that are ComfyUI sockets rather than widgets: maskmod tokenizes phrases with the model's CLIP and takes
# its regions (phrase + MASK) from a chain of region nodes.
REGIONS = "ATTNPROC_REGIONS"
EXTRA_SOCKETS = {"maskmod": [{"name": "clip", "type": "CLIP"}, {"name": "regions", "type": REGIONS}]}
MULTILINE = {"prompt"}
REGION_NODE = {
    "method": None, "node_id": "AttnProcRegion", "display_name": "attnproc: region",
    "description": "One maskmod region: a phrase of the prompt and the MASK where it should appear (one mask, or "
                   "one per video frame). Chain region nodes to add more; later regions lie on top.",
    "sockets": [{"name": "mask", "type": "MASK"}, {"name": "regions", "type": REGIONS, "optional": True}],
    "widgets": [{"name": "phrase", "kind": "STRING", "default": "", "multiline": False,
                 "tooltip": "a part of the prompt (as typed in CLIPTextEncode)"}],
    "output": REGIONS, "run": "region"}


# ----------------------------------------------------------------------------- the pack's files
_INIT = '''"""attnproc ComfyUI nodes (generated by `attnproc export-comfy`): one node per attnproc method.

Each node takes a MODEL and returns it patched: model.clone() with the method installed as
transformer_options["optimized_attention_override"]. attnproc itself must be installed in ComfyUI's Python
(see README.md); this is checked here, when ComfyUI loads the pack.
"""
from .nodes import NODE_SPECS, check_attnproc, comfy_api_available, v1_mappings

check_attnproc()

if comfy_api_available():
    from .nodes import comfy_entrypoint  # noqa: F401  (V3: ComfyUI calls it)
else:  # older ComfyUI: V1 mappings (ComfyUI reads these first, so they are only exported here)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = v1_mappings()

WEB_DIRECTORY = None
'''

_NODES = '''"""Node classes generated from NODE_SPECS (the attnproc registry's option schema at export time)."""
from __future__ import annotations

import json
from pathlib import Path

_PACK = json.loads((Path(__file__).parent / "nodes.json").read_text())
NODE_SPECS = _PACK["nodes"]
CATEGORY = "attnproc/attention"


def check_attnproc():
    """attnproc must be importable from ComfyUI's Python; say how to install it if it is not."""
    try:
        import attnproc.workflows.comfy_runtime  # noqa: F401  (does not import diffusers)
    except ImportError as e:
        raise ImportError(f"the attnproc node pack needs the attnproc package in ComfyUI's Python ({e}). It is "
                          f"not on PyPI; install it from where it is: {_PACK['install']}") from e
    import attnproc

    if attnproc.__version__ != _PACK["attnproc_version"]:
        import logging

        logging.getLogger("attnproc.comfy").warning(
            "attnproc nodes were exported from attnproc %s but attnproc %s is installed; re-export them with "
            "`attnproc export-comfy` if a node's options differ", _PACK["attnproc_version"], attnproc.__version__)


def check_comfyui():
    """The nodes work through transformer_options["optimized_attention_override"] (ComfyUI 0.3.59 and later);
    on an older ComfyUI they would load and never be called."""
    import inspect

    try:
        import comfy.ldm.modules.attention as attention
    except ImportError:  # not inside ComfyUI (the pack driven by its own tests)
        return
    wrap = getattr(attention, "wrap_attn", None)
    if wrap is None or "optimized_attention_override" not in inspect.getsource(wrap):
        raise RuntimeError("this ComfyUI has no optimized_attention_override (added in ComfyUI 0.3.59, "
                           "2025-09-12), so attnproc nodes would never run: update ComfyUI")


def comfy_api_available() -> bool:
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


def run(spec, **inputs):
    from attnproc.workflows import comfy_runtime as rt

    if spec["run"] == "region":
        return rt.add_region(inputs.get("regions"), inputs["phrase"], inputs["mask"])
    check_comfyui()
    if spec["run"] == "steer":
        from attnproc.workflows.comfy_steer import run_node

        return run_node(spec["node_id"], inputs)
    if spec["run"] == "maskmod":
        return rt.patch_maskmod(inputs.pop("model"), inputs.pop("clip"), inputs.pop("prompt"),
                                inputs.pop("regions"), **inputs)
    return rt.patch_model(inputs.pop("model"), spec["method"], **inputs)


# ------------------------------------------------------------------ V1
def _v1_input(w):
    if w["kind"] == "COMBO":
        return (w["options"], {"default": w["default"], "tooltip": w["tooltip"]})
    extra = {k: w[k] for k in ("default", "min", "max", "step", "multiline") if k in w}
    return (w["kind"], {**extra, "tooltip": w["tooltip"]})


def _v1_class(spec):
    def patch(self, **inputs):
        return (run(spec, **inputs),)

    required = {s["name"]: (s["type"],) for s in spec["sockets"] if not s.get("optional")}
    required.update({w["name"]: _v1_input(w) for w in spec["widgets"]})
    optional = {s["name"]: (s["type"],) for s in spec["sockets"] if s.get("optional")}
    return type(spec["node_id"], (), {
        "INPUT_TYPES": classmethod(lambda cls: {"required": dict(required), "optional": dict(optional)}),
        "RETURN_TYPES": (spec["output"],), "FUNCTION": "patch", "CATEGORY": CATEGORY,
        "DESCRIPTION": spec["description"], "patch": patch,
    })


def v1_mappings():
    classes = {s["node_id"]: _v1_class(s) for s in NODE_SPECS}
    names = {s["node_id"]: s["display_name"] for s in NODE_SPECS}
    return classes, names


# ------------------------------------------------------------------ V3
def _v3_input(io, w):
    kind, tip = w["kind"], w["tooltip"]
    if kind == "COMBO":
        return io.Combo.Input(w["name"], options=w["options"], default=w["default"], tooltip=tip)
    if kind == "BOOLEAN":
        return io.Boolean.Input(w["name"], default=w["default"], tooltip=tip)
    if kind == "INT":
        return io.Int.Input(w["name"], default=w["default"], min=w["min"], max=w["max"], step=w["step"], tooltip=tip)
    if kind == "FLOAT":
        return io.Float.Input(w["name"], default=w["default"], min=w["min"], max=w["max"], step=w["step"],
                              tooltip=tip)
    return io.String.Input(w["name"], default=w["default"], multiline=w.get("multiline", False), tooltip=tip)


def _v3_type(io, name):
    return {"MODEL": io.Model, "CLIP": io.Clip, "MASK": io.Mask}.get(name) or io.Custom(name)


def _v3_class(io, spec):
    def define_schema(cls):
        sockets = [_v3_type(io, s["type"]).Input(s["name"], optional=s.get("optional", False))
                   for s in spec["sockets"]]
        return io.Schema(node_id=spec["node_id"], display_name=spec["display_name"], category=CATEGORY,
                         description=spec["description"],
                         inputs=sockets + [_v3_input(io, w) for w in spec["widgets"]],
                         outputs=[_v3_type(io, spec["output"]).Output()])

    def execute(cls, **inputs):
        return io.NodeOutput(run(spec, **inputs))

    return type(spec["node_id"], (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                                   "execute": classmethod(execute)})


def v3_nodes():
    from comfy_api.latest import io

    return [_v3_class(io, spec) for spec in NODE_SPECS]


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class AttnProcExtension(ComfyExtension):
        async def get_node_list(self):
            return v3_nodes()

    return AttnProcExtension()
'''

_README = """# attnproc nodes for ComfyUI

Generated by `attnproc export-comfy` from attnproc {version}. One node per attnproc method ({count}): {names}.

Each node takes a `MODEL` and returns a patched `MODEL` (`model.clone()` with the method as
`transformer_options["optimized_attention_override"]`; needs ComfyUI 0.3.59 or later). Put it between the model
loader and the sampler. Chained attnproc nodes compose (one base method such as radial or gna, plus edits); an
attention-override node placed *after* them (Sage attention patches and the like) replaces them. The token grid
comes from what ComfyUI passes: `grid_sizes` (Wan 2.1/2.2) and `activations_shape` (SD1.x/SDXL UNets); methods
that need it refuse other models when the node runs. The step comes from `sigmas` within `sample_sigmas`
(restarting in each `KSamplerAdvanced` of a split schedule), the layer from `block_index`.

## Install
1. Copy this folder into `ComfyUI/custom_nodes/`.
2. Install attnproc into ComfyUI's Python. attnproc is not on PyPI; install it from where it is:
   {install}
   The pack checks this when ComfyUI loads it and says what is missing.

Example workflows: `example_workflows/` (UI format, loadable from the menu) and `example_workflows_api/`
(API format, for `POST /prompt`). The examples use Wan 2.1 T2V 1.3B (ComfyUI's file names for it).
"""


def _pyproject(version: str, methods: list[str]) -> str:
    return f'''[project]
name = "{PACK_NAME}"
description = "attnproc attention methods as ComfyUI MODEL patches: {", ".join(methods)}."
version = "{version}"
license = {{ text = "Apache-2.0" }}
# attnproc is not on PyPI: install it from its wheel, source tree or repository (README.md); the pack checks it
dependencies = []

[project.urls]
Repository = "https://github.com/attnproc/attnproc"

[tool.comfy]
PublisherId = "attnproc"
DisplayName = "attnproc nodes"
Icon = ""
includes = []
'''


# Example graphs per model family: (API nodes before the attnproc node, KSampler inputs, sampler extras). Model
# file names are the ones ComfyUI's own templates use.
_SD15 = {
    "loaders": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    },
    "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
    "sampler": {"steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"},
    "save": {"class_type": "SaveImage", "inputs": {}},
}
_WAN21 = {
    "loaders": {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                                                      "weight_dtype": "default"}},
        "9": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                      "type": "wan"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 832, "height": 480, "length": 33,
                                                                   "batch_size": 1}},
    },
    "model": ["1", 0], "clip": ["9", 0], "vae": ["10", 0],
    "sampler": {"steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"},
    "save": {"class_type": "SaveAnimatedWEBP", "inputs": {"fps": 16.0, "lossless": False, "quality": 90,
                                                          "method": "default"}},
}
# which example each method ships with: Wan 2.1 (served by every method); SD 1.5 for methods named here
EXAMPLE_FAMILY: dict[str, str] = {"structured": "sd15", "isolate": "sd15", "keylock": "sd15"}
# widget order of the stock nodes in UI-format workflows (ComfyUI's own input order)
_WIDGET_ORDER = {
    "CheckpointLoaderSimple": ["ckpt_name"], "UNETLoader": ["unet_name", "weight_dtype"],
    "CLIPLoader": ["clip_name", "type"], "VAELoader": ["vae_name"], "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [], "SaveImage": ["filename_prefix"],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"],
    "SolidMask": ["value", "width", "height"], "MaskComposite": ["x", "y", "operation"],
    "AttnProcRegion": ["phrase"], "AttnProcConceptClip": ["concepts"],
    "AttnProcConceptEncode": ["concepts", "text"],
}
_SOCKET_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING",
                 "negative": "CONDITIONING", "latent_image": "LATENT", "samples": "LATENT", "images": "IMAGE",
                 "mask": "MASK", "destination": "MASK", "source": "MASK", "regions": "ATTNPROC_REGIONS"}


EXAMPLE_PROMPT = "a red fox running in the snow"


def example_api(spec: dict) -> dict:
    """The method's example graph in API format (for ``POST /prompt``): its node between the model loader and
    the sampler, on the family it serves."""
    fam = _SD15 if EXAMPLE_FAMILY.get(spec["method"]) == "sd15" else _WAN21
    api = json.loads(json.dumps(fam["loaders"]))
    api["2"] = {"class_type": spec["node_id"],
                "inputs": {"model": fam["model"], **{w["name"]: w["default"] for w in spec["widgets"]}}}
    api["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": EXAMPLE_PROMPT, "clip": fam["clip"]}}
    if spec["run"] == "maskmod":  # the fox in the left half of the frame: masks made in the graph, no files
        width, height = api["5"]["inputs"]["width"], api["5"]["inputs"]["height"]
        api["11"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}}
        api["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 2, "height": height}}
        api["13"] = {"class_type": "MaskComposite", "inputs": {"destination": ["11", 0], "source": ["12", 0],
                                                               "x": 0, "y": 0, "operation": "add"}}
        api["14"] = {"class_type": "AttnProcRegion", "inputs": {"phrase": "a red fox", "mask": ["13", 0]}}
        api["2"]["inputs"].update(clip=fam["clip"], regions=["14", 0], prompt=EXAMPLE_PROMPT)
    api["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": fam["clip"]}}
    if spec["method"] in STEER_NODES:  # the edit encodes its prompts with the same CLIP
        example_graph(api, spec["method"], fam["clip"])
    api["6"] = {"class_type": "KSampler", "inputs": {"seed": 0, **fam["sampler"], "denoise": 1.0,
                                                     "model": ["2", 0], "positive": ["3", 0],
                                                     "negative": ["4", 0], "latent_image": ["5", 0]}}
    api["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": fam["vae"]}}
    api["8"] = {"class_type": fam["save"]["class_type"],
                "inputs": {"filename_prefix": f"attnproc_{spec['method']}", **fam["save"]["inputs"],
                           "images": ["7", 0]}}
    return dict(sorted(api.items(), key=lambda kv: int(kv[0])))


def example_ui(spec: dict, api: dict) -> dict:
    """The same graph in ComfyUI's UI (LiteGraph) format: nodes with widget values in input order, and links."""
    order = {**_WIDGET_ORDER, spec["node_id"]: [w["name"] for w in spec["widgets"]]}
    links, outputs, nodes = [], {}, []
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), name])
    for link_id, src, slot, dst, _ in links:
        outputs.setdefault((src, slot), []).append(link_id)
    type_of = {}  # (node, slot) -> LiteGraph type name, from what consumes it
    for link_id, src, slot, dst, name in links:
        type_of[(src, slot)] = _SOCKET_TYPES[name]
    for i, (nid, node) in enumerate(api.items()):
        n = int(nid)
        ins = [{"name": name, "type": type_of[(int(v[0]), v[1])],
                "link": next(l[0] for l in links if l[3] == n and l[4] == name)}
               for name, v in node["inputs"].items() if isinstance(v, list)]
        slots = sorted({slot for (src, slot) in outputs if src == n})
        outs = [{"name": type_of[(n, s)], "type": type_of[(n, s)], "links": outputs[(n, s)], "slot_index": s}
                for s in slots]
        widgets = [node["inputs"].get(w, "fixed") for w in order[node["class_type"]]]
        nodes.append({"id": n, "type": node["class_type"], "pos": [(n % 4) * 380, (n // 4) * 260],
                      "size": [340, 120], "flags": {}, "order": i, "mode": 0, "inputs": ins, "outputs": outs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    ui_links = [[lid, src, slot, dst, [i["name"] for i in next(x for x in nodes if x["id"] == dst)["inputs"]]
                 .index(name), type_of[(src, slot)]] for lid, src, slot, dst, name in links]
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def install_hint() -> str:
    """How to install the attnproc this pack was exported from (it is not on PyPI)."""
    root = Path(attnproc.__file__).resolve().parent.parent
    source = f"the source tree at {root}" if (root / "pyproject.toml").exists() else "the attnproc source tree"
    return (f"build a wheel from {source} with `python -m build` and `pip install dist/attnproc-"
            f"{attnproc.__version__}-py3-none-any.whl` into ComfyUI's Python, or `pip install <path to the "
            f"source tree>` (or a VCS URL `pip install git+<repository URL>`)")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def export_comfy(directory: str | Path, methods: list[str] | None = None, force: bool = False) -> Path:
    """Write the node pack to ``directory`` (built in a temporary folder, then moved into place)."""
    directory = Path(directory)
    specs = node_specs(methods)
    if not specs:
        raise ValueError("no methods to export")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} exists and is not empty; pass --force to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        names = [s["method"] for s in specs if s["method"] is not None]
        _write(tmp / "__init__.py", _INIT)
        _write(tmp / "nodes.py", _NODES)
        pack = {"attnproc_version": attnproc.__version__, "install": install_hint(), "nodes": specs}
        _write(tmp / "nodes.json", json.dumps(pack, indent=1) + "\n")
        _write(tmp / "pyproject.toml", _pyproject(attnproc.__version__, names))
        _write(tmp / "README.md", _README.format(version=attnproc.__version__, count=len(names),
                                                  names=", ".join(names), install=install_hint()))
        for spec in (s for s in specs if s["method"] is not None):
            api = example_api(spec)
            ui = example_ui(spec, api)
            _write(tmp / "example_workflows" / f"attnproc_{spec['method']}.json", json.dumps(ui, indent=1) + "\n")
            _write(tmp / "example_workflows_api" / f"attnproc_{spec['method']}_api.json",
                   json.dumps(api, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory
