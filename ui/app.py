"""``attnproc ui``: a gradio 6 app to render a prompt with any registered method, side by side with dense.

Everything method-specific is generated from the registry's option schema (``attnproc.methods()``): numbers with
a range become sliders, choices dropdowns, booleans checkboxes, strings textboxes. All widgets write into one
"options (JSON)" box, which is also where options of type ``any`` are edited; an option named ``regions`` (mask
guided edits) additionally gets an image editor whose layers become region masks, one phrase per line; a method
with a ``concepts`` option (keylock) gets file pickers for its concept files and covariance and a β per concept,
which write into the options box.

One job at a time (``queue(default_concurrency_limit=1)``); the progress bar follows the pipeline's denoising
loop (``gr.Progress(track_tqdm=True)``); the server binds to 127.0.0.1 unless told otherwise.

API endpoints (``gradio_client``): ``/generate`` (what the button runs) and ``/generate_json`` (the same with
plain arguments, returning a JSON summary with server-side output paths).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import attnproc
from attnproc.options import OptionInfo
from attnproc.pipelines import NAMES

DEFAULT_PIPELINES = tuple(f"tiny:{f}" for f in NAMES)
CSS = """
#attnproc-title {margin-bottom: 0}
.attnproc-stats textarea {font-family: monospace}
"""


# ----------------------------------------------------------------------------- widgets from the schema
AUTOMATIC = "automatic"
MAX_SLIDER_STEPS = 2000  # wider integer ranges get a number box: a slider cannot hit one value in 10,000
MAX_FLOAT_SPAN = 100  # float sliders move in span/100 steps: wider ranges get a number box


def widget_spec(info: OptionInfo) -> dict:
    """How an option is edited: ``{"kind": slider|number|dropdown|checkbox|textbox|json, ...}``. An option whose
    default is None ("automatic": the method picks per family) starts empty or at "automatic", never at a
    number it would not use."""
    automatic = info.default is None
    if info.choices is not None:
        choices = list(info.choices)
        return {"kind": "dropdown", "choices": [AUTOMATIC, *choices] if automatic else choices,
                "value": AUTOMATIC if automatic else info.default}
    if info.type == "bool":
        if automatic:
            return {"kind": "dropdown", "choices": [AUTOMATIC, "True", "False"], "value": AUTOMATIC}
        return {"kind": "checkbox", "value": bool(info.default)}
    if info.type in ("int", "float"):
        bounded = info.low is not None and info.high is not None
        narrow = bounded and info.high - info.low <= (MAX_SLIDER_STEPS if info.type == "int" else MAX_FLOAT_SPAN)
        if bounded and narrow and not automatic:
            step = 1 if info.type == "int" else _float_step(info.low, info.high)
            return {"kind": "slider", "minimum": info.low, "maximum": info.high, "step": step,
                    "value": info.default, "integer": info.type == "int"}
        return {"kind": "number", "minimum": info.low, "maximum": info.high, "value": info.default,
                "integer": info.type == "int", "automatic": automatic}
    if info.type == "str":
        return {"kind": "textbox", "value": info.default or ""}
    return {"kind": "json", "value": info.default}


def _float_step(low: float, high: float) -> float:
    span = float(high) - float(low)
    return float(f"{span / 100:.1g}") if span > 0 else 0.01


def default_options(method: str) -> dict:
    info = _info(method)
    return {o.name: o.default for o in info.options} if info else {}


def _info(method: str) -> attnproc.MethodInfo | None:
    return next((m for m in attnproc.methods() if m.name == method), None)


# ----------------------------------------------------------------------------- the work
class Renderer:
    """Loads pipelines on first use (one at a time), checks requests against them and renders one request."""

    def __init__(self):
        self._pipes: dict[str, Any] = {}
        self._facts: dict[str, Any] = {}
        self.out_dir = Path(tempfile.mkdtemp(prefix="attnproc-ui-"))
        self._count = 0

    def facts(self, spec: str):
        """What the pipeline is (family, call parameters), read from its configuration, not its weights."""
        if spec not in self._facts:
            from attnproc.workflows.preflight import pipeline_facts

            self._facts[spec] = pipeline_facts(spec)
        return self._facts[spec]

    def pipeline(self, spec: str):
        if spec not in self._pipes:
            from attnproc.workflows.render import load_pipeline

            self._pipes.clear()  # one pipeline in memory at a time
            self._pipes[spec] = load_pipeline(spec, {}, "cuda" if torch.cuda.is_available() else "cpu")
        return self._pipes[spec]

    def serves(self, method: str, spec: str) -> bool | None:
        """Whether ``method`` (with its default options) runs on ``spec``; None when that cannot be told
        beforehand (the method needs options first, or the pipeline's configuration cannot be read)."""
        from attnproc.workflows.preflight import PreflightError, check_method, create_method

        try:
            create_method(method, {})
            facts = self.facts(spec)
        except (ValueError, TypeError, OSError):
            return None
        try:
            check_method(facts, method, {})
        except PreflightError:
            return False
        return True

    def generate(self, pipeline: str, method: str, prompt: str, negative_prompt: str = "", seed: int = 0,
                 steps: int = 2, height: int = 0, width: int = 0, frames: int = 0, compare: bool = True,
                 options: dict | None = None, repeats: int = 3) -> dict:
        from attnproc.workflows.jobs import Job
        from attnproc.workflows.preflight import check_method, create_method, with_call_prompt
        from attnproc.workflows.render import build_call, compare_frames, run_once
        from attnproc.workflows.timing import check_counts, compare_runs, measure_runs

        if not prompt or not prompt.strip():
            raise ValueError("prompt: give a prompt")
        check_counts(int(repeats), 1)
        options = with_call_prompt(method, dict(options or {}), prompt)
        create_method(method, options)  # option errors before anything is loaded
        facts = self.facts(pipeline)
        check_method(facts, method, options)  # the family, from the configuration: before any weights load
        pipe = self.pipeline(pipeline)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")
        job = Job(index=0, name=None, prompt=prompt, negative_prompt=negative_prompt or None, seed=int(seed),
                  steps=int(steps) or None, height=int(height) or None, width=int(width) or None,
                  frames=(int(frames) or None) if facts.video else None, guidance_scale=None, method=method,
                  options=options)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._count += 1
        stem = self.out_dir / f"{self._count:04d}"

        def render(name: str, opts: dict):
            return lambda: run_once(pipe, name, opts, build_call(pipe, pipeline, job, device), device)

        if compare and method != "dense":
            run, ref, timing = compare_runs(render(method, options), render("dense", {}), repeats=int(repeats),
                                            names=(method, "dense"))
        else:
            run, ref = None, None
            run, timings = measure_runs(render(method, options), repeats=int(repeats))
            timing = {method: timings}
        result = {"pipeline": pipeline, "method": method, "options": run["method_options"], "seed": int(seed),
                  "kind": run["kind"], "shape": list(run["frames"].shape), "timing": timing}
        outputs = {method: _save(run["frames"], run["kind"], stem.with_name(f"{stem.name}-{method}"))}
        if ref is not None:
            outputs["dense"] = _save(ref["frames"], ref["kind"], stem.with_name(f"{stem.name}-dense"))
            result["difference_to_dense"] = compare_frames(run["frames"], ref["frames"])
        picture, caption = mask_picture(run["handle"])
        mask_path = self.out_dir / f"{stem.name}-mask.png"
        picture.save(mask_path, format="PNG")
        result.update(outputs={k: str(v) for k, v in outputs.items()}, mask=str(mask_path), mask_caption=caption)
        return result


def _save(frames: np.ndarray, kind: str, stem: Path) -> Path:
    from attnproc.workflows.media import save_image, save_video

    if kind == "image":
        return save_image(frames[0], stem.with_suffix(".png"))
    return save_video(frames, stem.with_suffix(".mp4"))


def mask_picture(handle, size: int = 384) -> tuple[Image.Image, str]:
    """The method's sparsity pattern (``Method.token_mask``) at the layout of the last forward, with a legend
    (white = computed pair, black = skipped), and its caption."""
    from attnproc.workflows.maskviz import handle_mask, legend_image

    try:
        found = handle_mask(handle)
    except Exception as e:  # a method whose pattern needs more than the site gives
        found = (None, f"pattern not available: {e}")
    if found is None:
        found = (None, "no token layout was seen: pattern unknown")
    mask, caption = found
    if mask is None:
        mask = torch.ones(1, 1, dtype=torch.bool) if caption.startswith("every") else torch.full((1, 1), 0.5)
    return legend_image(mask, caption, size=size), caption


def regions_from_editor(editor: Any, phrases: str) -> list[dict] | None:
    """Image-editor layers (one per region, in order) + one phrase per line → ``[{"phrase", "mask"}]``."""
    if not editor or not isinstance(editor, dict):
        return None
    layers = [np.asarray(l) for l in (editor.get("layers") or []) if l is not None]
    masks = []
    for layer in layers:
        alpha = layer[..., 3] if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(*layer.shape[:2], -1).max(-1)
        if alpha.max() > 0:
            masks.append((alpha > 127).astype(np.float32))
    if not masks:
        return None
    names = [p.strip() for p in (phrases or "").splitlines() if p.strip()]
    if len(names) != len(masks):
        raise ValueError(f"regions: {len(masks)} drawn layer(s) but {len(names)} phrase(s); give one phrase per "
                         "line, in layer order")
    return [{"phrase": p, "mask": m} for p, m in zip(names, masks)]


def concept_options(files: Any, betas: str, covariance: Any, text: str | None) -> str:
    """The concept pickers → the options box: ``concepts`` as ``[{"file": path, "beta": b}]`` (one β per picked
    file, comma- or line-separated, in file order; an empty entry or an empty box keeps the file's own β) and
    ``covariance`` as the picked file's path. Other options in ``text`` are kept."""
    try:
        opts = json.loads(text or "{}")
    except json.JSONDecodeError:
        opts = {}
    paths = [str(getattr(f, "name", f)) for f in (files if isinstance(files, list) else [files] if files else [])]
    parts = [b.strip() for b in (betas or "").replace("\n", ",").split(",")]
    parts = [] if all(not b for b in parts) else parts
    if parts and len(parts) != len(paths):
        raise ValueError(f"β per concept: {len(parts)} value(s) for {len(paths)} concept file(s); give one per file "
                         "(empty = the file's own)")
    concepts = []
    for i, path in enumerate(paths):
        entry = {"file": path}
        if parts and parts[i]:
            try:
                entry["beta"] = float(parts[i])
            except ValueError:
                raise ValueError(f"β per concept: {parts[i]!r} (concept {i + 1}) is not a number; β is in "
                                 "[0, 1.5]") from None
        concepts.append(entry)
    opts["concepts"] = concepts or None
    if covariance:
        opts["covariance"] = str(getattr(covariance, "name", covariance))
    return json.dumps(opts, indent=1, default=str)


def pipeline_choices(renderer: Renderer, method: str, pipelines: list[str], current: str) -> tuple[list, str]:
    """The pipelines offered with ``method``: those it serves (or that cannot be told beforehand), and the
    selection: ``current`` if the method serves it, else the first one offered."""
    offered = [p for p in pipelines if renderer.serves(method, p) is not False] or list(pipelines)
    keep = current in offered or (current and current not in pipelines and renderer.serves(method, current))
    return offered, current if keep else offered[0]


# ----------------------------------------------------------------------------- the app
def build_app(pipelines: list[str] | None = None, renderer: Renderer | None = None):
    import gradio as gr

    renderer = renderer or Renderer()
    pipelines = list(pipelines or DEFAULT_PIPELINES)
    infos = attnproc.methods()
    names = [m.name for m in infos]
    first = "dense" if "dense" in names else names[0]

    with gr.Blocks(title="attnproc") as demo:
        gr.Markdown("## attnproc: attention methods for diffusers", elem_id="attnproc-title")
        with gr.Row():
            with gr.Column(scale=1):
                pipeline = gr.Dropdown(pipelines, value=pipelines[0], label="pipeline", allow_custom_value=True,
                                       info="hub id, local folder, or tiny:<family> (offline, random weights)")
                method = gr.Dropdown(names, value=first, label="method")
                summary = gr.Markdown(_info(first).summary if _info(first) else "")
                widgets: list[tuple[str, OptionInfo, Any]] = []
                groups = {}
                for info in infos:
                    with gr.Group(visible=info.name == first) as group:
                        for opt in info.options:
                            comp = _component(gr, opt)
                            if comp is not None:
                                widgets.append((info.name, opt, comp))
                    groups[info.name] = group
                has_regions = {m.name for m in infos if any(o.name == "regions" for o in m.options)}
                with gr.Group(visible=first in has_regions) as regions_group:
                    regions_editor = gr.ImageEditor(label="regions: draw one layer per region (or upload masks)",
                                                    type="numpy", height=320)
                    regions_phrases = gr.Textbox(label="region phrases (one per line, in layer order)", lines=2)
                has_concepts = {m.name for m in infos if any(o.name == "concepts" for o in m.options)}
                with gr.Group(visible=first in has_concepts) as concepts_group:
                    concept_files = gr.File(label="concept files (attnproc train-concept)", file_count="multiple",
                                            file_types=[".safetensors"], type="filepath")
                    concept_betas = gr.Textbox(label="β per concept (comma-separated, in file order; empty = the "
                                                     "file's own, 0.7)", placeholder="0.6, 0.7")
                    covariance_file = gr.File(label="covariance file (attnproc keylock-covariance)",
                                              file_types=[".safetensors"], type="filepath")
                options_json = gr.Code(json.dumps(default_options(first), indent=1, default=str), language="json",
                                       label="options (JSON): set by the widgets above; edit here for any-typed "
                                             "options", lines=4)
                prompt = gr.Textbox("a red fox in the snow", label="prompt", lines=2)
                negative = gr.Textbox("", label="negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0)
                    steps = gr.Slider(1, 100, value=2, step=1, label="steps")
                with gr.Row():
                    height = gr.Slider(0, 1536, value=0, step=8, label="height (0 = pipeline default)")
                    width = gr.Slider(0, 1536, value=0, step=8, label="width (0 = pipeline default)")
                    frames = gr.Slider(0, 257, value=0, step=1, label="frames (video; 0 = default)")
                compare = gr.Checkbox(True, label="also render with dense (side by side, speedup)")
                repeats = gr.Slider(1, 10, value=3, step=1, label="timed runs (after one warm-up run each; the "
                                                                "median and range are shown)")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="images (method | dense)", columns=2, height=320, elem_id="gallery")
                with gr.Row():
                    video = gr.Video(label="method", visible=False, elem_id="video-method")
                    video_dense = gr.Video(label="dense", visible=False, elem_id="video-dense")
                mask = gr.Image(label="sparsity mask (legend below the picture)", type="numpy", height=320,
                                elem_id="mask")
                stats = gr.JSON(label="timings (median and range of warm runs) and difference (0-255 pixel levels)",
                                elem_id="stats")

        def on_method(name, current):
            info = _info(name)
            offered, value = pipeline_choices(renderer, name, pipelines, current)
            return ([gr.update(visible=n == name) for n in groups]
                    + [gr.update(visible=name in has_regions), gr.update(visible=name in has_concepts),
                       info.summary if info else "",
                       json.dumps(default_options(name), indent=1, default=str),
                       gr.update(choices=offered, value=value)])

        method.change(on_method, [method, pipeline],
                      list(groups.values()) + [regions_group, concepts_group, summary, options_json, pipeline],
                      queue=False, api_visibility="private")

        for owner, opt, comp in widgets:
            def on_widget(value, text, _opt=opt):
                try:
                    opts = json.loads(text or "{}")
                except json.JSONDecodeError:
                    opts = {}
                opts[_opt.name] = _widget_value(_opt, value)
                return json.dumps(opts, indent=1, default=str)

            comp.change(on_widget, [comp, options_json], options_json, queue=False, api_visibility="private")

        def on_concepts(files, betas, covariance, text):
            try:
                return concept_options(files, betas, covariance, text)
            except ValueError as e:
                raise gr.Error(str(e)) from None

        for comp in (concept_files, concept_betas, covariance_file):
            comp.change(on_concepts, [concept_files, concept_betas, covariance_file, options_json], options_json,
                        queue=False, api_visibility="private")

        def generate(pipeline_, method_, prompt_, negative_, seed_, steps_, height_, width_, frames_, compare_,
                     repeats_, options_text, editor, phrases, progress=gr.Progress(track_tqdm=True)):
            try:
                opts = _parse_options(options_text, method_)
                if method_ in has_regions:
                    regions = regions_from_editor(editor, phrases)
                    if regions is not None:
                        opts["regions"] = regions
                res = renderer.generate(pipeline_, method_, prompt_, negative_, seed_, steps_, height_, width_,
                                        frames_, compare_, opts, int(repeats_))
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                raise gr.Error(str(e)) from None
            outs = res.pop("outputs")
            mask_img = np.asarray(Image.open(res["mask"]).convert("RGB"))
            if res["kind"] == "image":
                items = [(p, n) for n, p in outs.items()]
                return (items, gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                        mask_img, res)
            vids = [p if p.endswith(".mp4") else None for p in outs.values()]
            items = [] if all(vids) else [(str(sorted(Path(p).glob("*.png"))[0]), n) for n, p in outs.items()]
            return (items, gr.update(value=vids[0], visible=bool(vids[0])),
                    gr.update(value=vids[1] if len(vids) > 1 else None, visible=len(vids) > 1 and bool(vids[1])),
                    mask_img, res)

        run.click(generate, [pipeline, method, prompt, negative, seed, steps, height, width, frames, compare,
                             repeats, options_json, regions_editor, regions_phrases],
                  [gallery, video, video_dense, mask, stats], api_name="generate")

        def generate_json(pipeline: str, method: str, prompt: str, negative_prompt: str = "", seed: int = 0,
                          steps: int = 2, height: int = 0, width: int = 0, frames: int = 0, compare: bool = True,
                          options: str = "{}", repeats: int = 3) -> dict:
            """Render and return a JSON summary (timings, speedup, difference, server-side output paths)."""
            try:
                return renderer.generate(pipeline, method, prompt, negative_prompt, seed, steps, height, width,
                                         frames, compare, _parse_options(options, method), int(repeats))
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                raise gr.Error(str(e)) from None

        gr.api(generate_json, api_name="generate_json")
    demo.queue(default_concurrency_limit=1)
    demo.renderer = renderer
    return demo


def _parse_options(text: str | dict | None, method: str) -> dict:
    if isinstance(text, dict):
        return text
    try:
        opts = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"options (JSON): not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"options (JSON): must be an object of option name to value, got {opts!r}")
    return opts


def _widget_value(opt: OptionInfo, value):
    if value == AUTOMATIC or (value in ("", None) and opt.default is None):
        return None
    if opt.type in ("int", "float") and isinstance(value, str):  # an automatic option's textbox
        try:
            number = float(value)
        except ValueError:
            return value.strip()  # validation names the option and its range
        return int(number) if opt.type == "int" and number.is_integer() else number
    if opt.type == "bool" and isinstance(value, str):
        return value == "True"
    if opt.type == "int" and value is not None:
        return int(value)
    if opt.type == "float" and value is not None:
        return float(value)
    if opt.type == "any":
        try:
            return json.loads(value) if isinstance(value, str) and value.strip() else None
        except json.JSONDecodeError:
            return value
    return value


def _component(gr, opt: OptionInfo):
    spec = widget_spec(opt)
    label = opt.name + (f": {opt.help}" if opt.help else "")
    kind = spec["kind"]
    if kind == "dropdown":
        return gr.Dropdown(spec["choices"], value=spec["value"], label=label)
    if kind == "checkbox":
        return gr.Checkbox(spec["value"], label=label)
    if kind == "slider":
        return gr.Slider(spec["minimum"], spec["maximum"], value=spec["value"], step=spec["step"], label=label)
    if kind == "number":
        if spec.get("automatic"):  # gr.Number shows None as 0: a textbox can be truly empty
            return gr.Textbox("", label=label + " (empty = automatic)", placeholder=AUTOMATIC)
        return gr.Number(spec["value"], label=label, minimum=spec["minimum"], maximum=spec["maximum"],
                         precision=0 if spec["integer"] else None)
    if kind == "textbox":
        return gr.Textbox(spec["value"], label=label)
    if opt.name == "regions":
        return None  # the regions editor below, or the JSON box
    return gr.Textbox(json.dumps(spec["value"], default=str), label=label + " (JSON)")


def launch(host: str = "127.0.0.1", port: int | None = 7860, pipelines: list[str] | None = None, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Build and serve the app (blocks unless ``prevent_thread_lock``). Binds to 127.0.0.1 unless told otherwise."""
    import gradio as gr

    demo = build_app(pipelines)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                quiet=quiet, theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(demo.renderer.out_dir)])
    return demo
