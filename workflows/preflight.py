"""Checks made before anything renders: does the method serve this pipeline, do the job's fields fit its call,
and does a method's own ``prompt`` option agree with the prompt the pipeline renders?

The pipeline's configuration is read, not its weights: for a hub id or a local folder, ``model_index.json``
names the pipeline class (whose ``__call__`` says which fields it takes) and each denoiser's ``config.json``
builds that denoiser on the meta device (no memory, no weights), tokenizers load from their small files when a
method asks for them. The method is then bound to that stand-in exactly as ``attnproc.apply`` binds it to the
real pipeline, so every refusal ``bind`` makes (a family the method does not serve, a phrase not in the prompt)
happens here. ``tiny:<family>`` pipelines are built outright: they are small and in memory.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

import attnproc
from attnproc.families import family_of

DENOISERS = ("unet", "transformer", "transformer_2")
# job field -> the pipeline __call__ parameter it sets
CALL_FIELDS = {"negative_prompt": "negative_prompt", "steps": "num_inference_steps", "height": "height",
               "width": "width", "frames": "num_frames", "guidance_scale": "guidance_scale"}


class PreflightError(ValueError):
    """A job that would fail mid-render, caught before anything renders."""


@dataclass(frozen=True)
class PipelineFacts:
    """What the checks need to know about a pipeline: its class, its call parameters, its denoisers' families,
    and a stand-in that ``Method.bind`` accepts."""

    spec: str
    pipeline_class: str
    call_parameters: frozenset
    families: dict
    target: Any

    @property
    def video(self) -> bool:
        return "num_frames" in self.call_parameters


class ConfigOnlyPipeline:
    """A pipeline read from its configuration only: denoisers built on the meta device, tokenizers loaded on
    first use; any other component is not available (``AttributeError``)."""

    def __init__(self, spec: str, index: dict):
        self._spec, self._index = spec, index

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._index:
            raise AttributeError(name)
        library, cls_name = self._index[name]
        if cls_name is None:
            value = None
        elif name in DENOISERS:
            import diffusers

            cls = getattr(diffusers, cls_name)
            with torch.device("meta"):
                value = cls.from_config(cls.load_config(self._spec, subfolder=name))
        elif name.startswith("tokenizer"):
            value = getattr(importlib.import_module(library), cls_name).from_pretrained(self._spec, subfolder=name)
        else:
            raise AttributeError(f"{name} (only denoisers and tokenizers are read before rendering)")
        setattr(self, name, value)  # loaded once per stand-in
        return value


def pipeline_facts(spec: str, options: dict | None = None) -> PipelineFacts:
    """Read ``spec`` (``tiny:<family>``, ``shapes:<kind>``, a local folder or a hub id) without loading weights."""
    source = spec
    if spec.startswith("shapes:"):
        from attnproc.pipelines.shapes_models import shapes_model_dir

        source = str(shapes_model_dir(spec[7:]))
    if spec.startswith("tiny:"):
        from attnproc.pipelines import tiny_pipeline

        pipe = tiny_pipeline(spec[5:], seed=int((options or {}).get("seed", 0)))
        cls, target = type(pipe), pipe
    else:
        import diffusers

        try:
            index = diffusers.DiffusionPipeline.load_config(source)
        except Exception as e:
            raise PreflightError(f"pipeline {spec!r}: cannot read its model_index.json: {e}") from None
        cls = getattr(diffusers, index.get("_class_name", ""), None)
        if cls is None:
            raise PreflightError(f"pipeline {spec!r}: unknown pipeline class {index.get('_class_name')!r}")
        target = ConfigOnlyPipeline(source, {k: v for k, v in index.items()
                                           if isinstance(v, (list, tuple)) and len(v) == 2})
    families = {}
    for name in DENOISERS:
        model = getattr(target, name, None)
        if isinstance(model, torch.nn.Module):
            families[name] = family_of(model).name  # UnsupportedModelError names the supported models
    if not families:
        raise PreflightError(f"pipeline {spec!r} ({cls.__name__}) has no denoiser ({', '.join(DENOISERS)})")
    params = frozenset(inspect.signature(cls.__call__).parameters)
    return PipelineFacts(spec, cls.__name__, params, families, target)


def create_method(method: str | list | tuple, options: dict):
    """A validated method instance (a name with its options, or a composition with options per name)."""
    if isinstance(method, (list, tuple)):
        return attnproc.create(list(method), **options)
    return attnproc.create(method, **options)


def check_method(facts: PipelineFacts, method: str | list | tuple, options: dict) -> None:
    """Refuse (``PreflightError`` naming the method and the pipeline) what ``attnproc.apply`` would refuse."""
    label = "+".join(method) if isinstance(method, (list, tuple)) else method
    try:
        instance = create_method(method, options)
        instance.bind(facts.target)
        instance.unbind(facts.target)  # the stand-in is reused: undo what bind added (a concept's token, say)
    except AttributeError:  # the method wants more than the configuration holds: it is checked when applied
        return
    except (ValueError, TypeError, RuntimeError) as e:
        raise PreflightError(f"method {label!r} cannot run on {facts.spec} "
                             f"({', '.join(sorted(set(facts.families.values())))}): {e}") from None


def check_fields(facts: PipelineFacts, fields: dict) -> None:
    """Refuse job fields (``frames``, ``steps`` ..., and ``call.<name>`` for extra call arguments) that the
    pipeline's ``__call__`` does not take."""
    for field, value in fields.items():
        param = CALL_FIELDS.get(field, field.removeprefix("call."))
        if value is not None and param not in facts.call_parameters:
            kind = "an image pipeline" if param == "num_frames" else f"its __call__ has no {param!r}"
            raise PreflightError(f"{field}: {facts.spec} ({facts.pipeline_class}) takes no {param!r} ({kind}); "
                                 "remove it")


def with_call_prompt(method: str | list | tuple, options: dict, prompt: str) -> dict:
    """A method option named ``prompt`` is the prompt the pipeline renders (maskmod finds its phrases in it):
    left empty, it is taken from ``prompt``; a different value is refused, since it would steer the wrong
    tokens. Returns the options with the prompt filled in."""
    if isinstance(method, (list, tuple)):
        out = dict(options)
        for name in method:
            mine = options.get(name) or {}
            filled = with_call_prompt(name, mine, prompt) if isinstance(mine, dict) else mine
            if filled != mine:
                out[name] = filled
        return out
    info = next((m for m in attnproc.methods() if m.name == method), None)
    if info is None or not any(o.name == "prompt" for o in info.options):
        return options
    given = options.get("prompt")
    if given in (None, ""):
        return {**options, "prompt": prompt}
    if given != prompt:
        raise PreflightError(f"option 'prompt' of method {method!r} is {given!r} but the pipeline renders {prompt!r}; "
                             "leave it out (the rendered prompt is used) or make the two equal")
    return options
