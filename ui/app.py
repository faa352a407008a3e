"""``attnproc ui``: a gradio 6 app to render a prompt with any registered method, side by side with dense.

Everything method-specific is generated from the registry's option schema (``attnproc.methods()``): numbers with
a range become sliders, choices dropdowns, booleans checkboxes, strings textboxes. All widgets write into one
"options (JSON)" box, which is also where options of type ``any`` are edited; an option named ``regions`` (mask
guided edits) additionally gets an image editor whose layers become region masks, one phrase per line.

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
def widget_spec(info: OptionInfo) -> dict:
    """How an option is edited: ``{"kind": slider|number|dropdown|checkbox|textbox|json, ...}``."""
    if info.choices is not None:
        return {"kind": "dropdown", "choices": list(info.choices), "value": info.default}
    if info.type == "bool":
        return {"kind": "checkbox", "value": bool(info.default)}
    if info.type in ("int", "float"):
        if info.low is not None and info.high is not None:
            step = 1 if info.type == "int" else _float_step(info.low, info.high)
            value = info.default if info.default is not None else info.low
            return {"kind": "slider", "minimum": info.low, "maximum": info.high, "step": step, "value": value,
                    "integer": info.type == "int", "optional": info.default is None}
        return {"kind": "number", "minimum": info.low, "maximum": info.high, "value": info.default,
                "integer": info.type == "int"}
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
    """Loads pipelines on first use (one at a time) and renders one request."""

    def __init__(self):
        self._pipes: dict[str, Any] = {}
        self.out_dir = Path(tempfile.mkdtemp(prefix="attnproc-ui-"))
        self._count = 0

    def pipeline(self, spec: str):
        if spec not in self._pipes:
            from attnproc.workflows.render import load_pipeline

            self._pipes.clear()  # one pipeline in memory at a time
            self._pipes[spec] = load_pipeline(spec, {}, "cuda" if torch.cuda.is_available() else "cpu")
        return self._pipes[spec]

    def generate(self, pipeline: str, method: str, prompt: str, negative_prompt: str = "", seed: int = 0,
                 steps: int = 2, height: int = 0, width: int = 0, frames: int = 0, compare: bool = True,
                 options: dict | None = None) -> dict:
        from attnproc.workflows.jobs import Job
        from attnproc.workflows.render import build_call, compare_frames, is_video_pipeline, run_once

        options = dict(options or {})
        attnproc.create(method, **options)  # validate before loading anything
        if not prompt or not prompt.strip():
            raise ValueError("prompt: give a prompt")
        pipe = self.pipeline(pipeline)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")
        video = is_video_pipeline(pipe)
        job = Job(index=0, name=None, prompt=prompt, negative_prompt=negative_prompt or None, seed=int(seed),
                  steps=int(steps) or None, height=int(height) or None, width=int(width) or None,
                  frames=(int(frames) or None) if video else None, guidance_scale=None, method=method,
                  options=options)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._count += 1
        stem = self.out_dir / f"{self._count:04d}"
        run = run_once(pipe, method, options, build_call(pipe, pipeline, job, device), device)
        result = {"pipeline": pipeline, "method": method, "options": run["method_options"], "seed": int(seed),
                  "kind": run["kind"], "shape": list(run["frames"].shape),
                  "timings": {method: {"total_s": round(run["total_s"], 4),
                                       "attention_s": round(run["attention_s"], 4)}}}
        outputs = {method: _save(run["frames"], run["kind"], stem.with_name(f"{stem.name}-{method}"))}
        if compare and method != "dense":
            ref = run_once(pipe, "dense", {}, build_call(pipe, pipeline, job, device), device)
            outputs["dense"] = _save(ref["frames"], ref["kind"], stem.with_name(f"{stem.name}-dense"))
            result["timings"]["dense"] = {"total_s": round(ref["total_s"], 4),
                                          "attention_s": round(ref["attention_s"], 4)}
            result["speedup"] = round(ref["total_s"] / max(run["total_s"], 1e-9), 3)
            result["attention_speedup"] = round(ref["attention_s"] / max(run["attention_s"], 1e-9), 3)
            result.update(compare_frames(run["frames"], ref["frames"]))
        mask, caption = mask_picture(run["handle"], job.steps or 1)
        mask_path = self.out_dir / f"{stem.name}-mask.png"
        from attnproc.workflows.media import save_image

        save_image(_framed(mask), mask_path)
        result.update(outputs={k: str(v) for k, v in outputs.items()}, mask=str(mask_path), mask_caption=caption)
        return result


def _save(frames: np.ndarray, kind: str, stem: Path) -> Path:
    from attnproc.workflows.media import save_image, save_video

    if kind == "image":
        return save_image(frames[0], stem.with_suffix(".png"))
    return save_video(frames, stem.with_suffix(".mp4"))


def mask_picture(handle, num_steps: int, size: int = 384) -> tuple[np.ndarray, str]:
    """The method's sparsity pattern (``Method.token_mask``) at the layout of the last forward, as an RGB picture
    (white = computed pair, black = skipped; block-averaged to at most ``size`` pixels). ``num_steps`` is kept for
    the caller's signature; the pattern shown is the method's sparse one, whatever its dense warm-up."""
    from attnproc.workflows.maskviz import mask_image, method_mask

    layouts = {k: v for k, v in handle.last_layouts().items() if v is not None}
    if not layouts:
        return _blank(size, 0.5), "no token layout was seen: pattern unknown"
    denoiser, layout = next(iter(layouts.items()))
    try:
        mask = method_mask(handle.method, handle.denoisers[denoiser].family, layout)
    except Exception as e:  # a method whose pattern needs more than the site gives
        return _blank(size, 0.5), f"pattern not available: {e}"
    where = f"{denoiser}, grid {layout.frames}x{layout.height}x{layout.width}, {layout.visual_len} tokens"
    if mask is None:
        return _blank(size, 1.0), f"every query-key pair computed (dense); {where}"
    img = mask_image(mask[0] if mask.ndim == 3 else mask, max_side=size).resize((size, size), Image.NEAREST)
    return np.asarray(img.convert("RGB")), f"density {float(mask.float().mean()):.3f} (head 0 shown); {where}"


def _blank(size: int, level: float) -> np.ndarray:
    return np.full((size, size, 3), int(level * 255), dtype=np.uint8)


def _framed(img: np.ndarray) -> np.ndarray:
    """A grey frame, so an all-white (dense) pattern is visible on a white page."""
    img = img.copy()
    img[:2], img[-2:], img[:, :2], img[:, -2:] = 128, 128, 128, 128
    return img


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
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="images (method | dense)", columns=2, height=320, elem_id="gallery")
                with gr.Row():
                    video = gr.Video(label="method", visible=False, elem_id="video-method")
                    video_dense = gr.Video(label="dense", visible=False, elem_id="video-dense")
                mask = gr.Image(label="sparsity mask", type="numpy", height=320, elem_id="mask")
                stats = gr.JSON(label="timings and difference", elem_id="stats")

        def on_method(name):
            info = _info(name)
            return ([gr.update(visible=n == name) for n in groups]
                    + [gr.update(visible=name in has_regions), info.summary if info else "",
                       json.dumps(default_options(name), indent=1, default=str)])

        method.change(on_method, method, list(groups.values()) + [regions_group, summary, options_json],
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

        def generate(pipeline_, method_, prompt_, negative_, seed_, steps_, height_, width_, frames_, compare_,
                     options_text, editor, phrases, progress=gr.Progress(track_tqdm=True)):
            try:
                opts = _parse_options(options_text, method_)
                if method_ in has_regions:
                    regions = regions_from_editor(editor, phrases)
                    if regions is not None:
                        opts["regions"] = regions
                res = renderer.generate(pipeline_, method_, prompt_, negative_, seed_, steps_, height_, width_,
                                        frames_, compare_, opts)
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                raise gr.Error(str(e)) from None
            outs = res.pop("outputs")
            mask_img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(res["mask"]).convert("RGB"))
            if res["kind"] == "image":
                items = [(p, n) for n, p in outs.items()]
                return (items, gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                        (mask_img), res)
            vids = [p if p.endswith(".mp4") else None for p in outs.values()]
            items = [] if all(vids) else [(str(sorted(Path(p).glob("*.png"))[0]), n) for n, p in outs.items()]
            return (items, gr.update(value=vids[0], visible=bool(vids[0])),
                    gr.update(value=vids[1] if len(vids) > 1 else None, visible=len(vids) > 1 and bool(vids[1])),
                    mask_img, res)

        run.click(generate, [pipeline, method, prompt, negative, seed, steps, height, width, frames, compare,
                             options_json, regions_editor, regions_phrases],
                  [gallery, video, video_dense, mask, stats], api_name="generate")

        def generate_json(pipeline: str, method: str, prompt: str, negative_prompt: str = "", seed: int = 0,
                          steps: int = 2, height: int = 0, width: int = 0, frames: int = 0, compare: bool = True,
                          options: str = "{}") -> dict:
            """Render and return a JSON summary (timings, speedup, difference, server-side output paths)."""
            try:
                return renderer.generate(pipeline, method, prompt, negative_prompt, seed, steps, height, width,
                                         frames, compare, _parse_options(options, method))
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
