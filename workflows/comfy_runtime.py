"""What an exported ComfyUI node runs: a registered attnproc method as ComfyUI's ``optimized_attention_override``.

ComfyUI calls every attention function through a wrapper that, when ``transformer_options`` holds an
``optimized_attention_override``, calls ``override(original_fn, q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, transformer_options=..., **more)`` instead. ``q, k, v`` are
``[B, S, H*D]`` (``[B, H, S, D]`` with ``skip_reshape``); the result is ``[B, S, H*D]`` (``[B, H, S, D]`` with
``skip_output_reshape``).

The override here:

* serves self-attention (query and key of the same length, no mask) with the method, building an
  :class:`attnproc.Site` from ``transformer_options`` and the model: family from ComfyUI's model class
  (:func:`family_from`), layer from ``block_index``, step from where ``sigmas``
  sits in ``sample_sigmas``, branch from ``cond_or_uncond``, token layout from ``attnproc_layout`` (a
  :class:`attnproc.TokenLayout` or its fields, set by another node) or from the latent shape ComfyUI records
  (``activations_shape`` / ``original_shape``) when it accounts for every token exactly;
* hands everything else (cross-attention, masked calls, a method that needs a layout it cannot get, a method
  that raises) to the override that was installed before it, or to ComfyUI's own attention: dense.

Nothing here imports ComfyUI; tests drive it with ComfyUI-shaped stand-ins.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch

import attnproc
from attnproc.context import StepContext
from attnproc.layout import TokenLayout
from attnproc.families import FAMILIES

log = logging.getLogger("attnproc.comfy")
OVERRIDE_KEY = "optimized_attention_override"
_ARG_NAMES = ("q", "k", "v", "heads")

# ComfyUI's model classes (comfy.model_base; subclasses such as WAN22 match through their bases) -> our families,
# from the family records. "BaseModel" (SD 1.x / 2.x) counts only as the exact class: every model derives from it.
_COMFY_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.comfy_models}


def family_from(model) -> str | None:
    """Our family name for a ComfyUI ``ModelPatcher`` (from ``model.model``'s class), or None if unknown."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    for cls in type(inner).__mro__:
        if cls.__name__ in _COMFY_FAMILIES and (cls is type(inner) or cls.__name__ != "BaseModel"):
            return _COMFY_FAMILIES[cls.__name__]
    return None


def step_from(transformer_options: dict) -> StepContext | None:
    """The denoising step: the index of ``sigmas`` (the current sigma) within ``sample_sigmas``."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    current = float(torch.as_tensor(sigmas).flatten()[0])
    schedule = transformer_options.get("sample_sigmas")
    index = num = None
    if schedule is not None:
        schedule = torch.as_tensor(schedule).flatten().float()
        num = max(int(schedule.numel()) - 1, 1)  # the last sigma (0) is the end, not a step
        close = torch.isclose(schedule, torch.tensor(current), rtol=1e-4, atol=1e-6).nonzero()
        index = int(close[0]) if len(close) else int((schedule - current).abs().argmin())
        index = min(index, num - 1)
    branch = None
    cou = transformer_options.get("cond_or_uncond")
    if cou:
        branch = ("cond" if cou[0] == 0 else "uncond") if len(cou) == 1 else "batched"
    return StepContext(index=index, num_steps=num, timestep=current, branch=branch, denoiser="diffusion_model")


def layout_from(transformer_options: dict, q_len: int) -> TokenLayout | None:
    """The token layout of a self-attention call of ``q_len`` tokens, or None when ComfyUI does not say."""
    given = transformer_options.get("attnproc_layout")
    if isinstance(given, TokenLayout):
        return given if given.seq_len == q_len else None
    if isinstance(given, dict):
        layout = TokenLayout(**given)
        return layout if layout.seq_len == q_len else None
    shape = transformer_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == q_len:  # UNet: [B, C, H, W] here
        return TokenLayout(1, int(shape[2]), int(shape[3]))
    shape = transformer_options.get("original_shape")
    if shape is not None and len(shape) in (4, 5):
        frames = int(shape[2]) if len(shape) == 5 else 1
        h, w = int(shape[-2]), int(shape[-1])
        for p in (1, 2):  # patch size of the common DiTs / UNet levels at full resolution
            if h % p == 0 and w % p == 0 and frames * (h // p) * (w // p) == q_len:
                return TokenLayout(frames, h // p, w // p)
    return None


def _to_bhsd(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    b, s, hd = t.shape
    return t.view(b, s, heads, hd // heads).transpose(1, 2)


def make_override(method: attnproc.Method, previous: Callable | None = None, family: str | None = None) -> Callable:
    """An ``optimized_attention_override`` running ``method``; ``previous`` (an override already installed) gets
    every call this one does not serve. ``family`` is the model's family (None: unknown; methods that need it
    then fall back)."""

    def fallback(original, args, kwargs):
        if previous is not None:
            return previous(original, *args, **kwargs)
        return original(*args, **kwargs)

    def override(original: Callable, *args, **kwargs):
        named = dict(zip(_ARG_NAMES, args))
        named.update({k: kwargs[k] for k in _ARG_NAMES if k in kwargs})
        q, k, v, heads = (named.get(n) for n in _ARG_NAMES)
        opts = kwargs.get("transformer_options") or {}
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        if q is None or k is None or v is None or heads is None or kwargs.get("mask") is not None:
            return fallback(original, args, kwargs)
        seq_axis = 2 if skip_reshape else 1
        if q.shape[seq_axis] != k.shape[seq_axis]:  # cross-attention: dense
            return fallback(original, args, kwargs)
        qh, kh, vh = (_to_bhsd(t, heads, skip_reshape) for t in (q, k, v))
        layout = layout_from(opts, qh.shape[2])
        if layout is None and method.needs_layout:
            return fallback(original, args, kwargs)
        block = opts.get("block_index")
        site = attnproc.Site(family=family, denoiser="diffusion_model", name=None,
                             index=int(block) if block is not None else None,
                             layer=int(block) if block is not None else None, kind="self", layout=layout,
                             step=step_from(opts))
        try:
            out = method.attention(qh, kh, vh, site)
        except Exception as e:  # never break a workflow: run the attention this override replaced
            log.warning("attnproc %s fell back to dense attention: %s", method.name, e)
            return fallback(original, args, kwargs)
        out = out.to(q.dtype)
        if kwargs.get("skip_output_reshape", False):
            return out
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)

    override.attnproc_method = method
    override.attnproc_previous = previous
    return override


def parse_widget_options(method: str, values: dict[str, Any]) -> dict:
    """Node widget values → method options: JSON strings for ``any``-typed options (empty = default) and for
    numeric options whose default is "automatic" (None)."""
    infos = {o.name: o for o in next(m for m in attnproc.methods() if m.name == method).options}
    options = {}
    for name, value in values.items():
        info = infos.get(name)
        if info is None:
            continue
        if info.type == "any" or (info.default is None and isinstance(value, str)):
            text = str(value).strip()
            if text == "" or text == "null":
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"option {name!r} of method {method!r}: not valid JSON: {e}") from None
        options[name] = value
    return options


def patch_model(model, method: str, **widget_values):
    """``model.clone()`` with ``method`` installed as the attention override, chaining any override already set."""
    instance = attnproc.create(method, **parse_widget_options(method, widget_values))
    patched = model.clone()
    options = dict(patched.model_options.get("transformer_options", {}))
    options[OVERRIDE_KEY] = make_override(instance, options.get(OVERRIDE_KEY), family_from(model))
    patched.model_options["transformer_options"] = options
    return patched
