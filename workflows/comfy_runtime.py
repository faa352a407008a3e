"""What an exported ComfyUI node runs: a registered attnproc method as ComfyUI's ``optimized_attention_override``.

ComfyUI (0.3.59 and later) calls every attention function through a wrapper that, when ``transformer_options``
holds an ``optimized_attention_override``, calls ``override(original_fn, q, k, v, heads, mask=None,
attn_precision=None, skip_reshape=False, skip_output_reshape=False, transformer_options=..., **more)`` instead
(``more``: ``scale``, ``enable_gqa``, ...). ``q, k, v`` are ``[B, S, H*D]`` (``[B, H, S, D]`` with
``skip_reshape``); the result is ``[B, S, H*D]`` (``[B, H, S, D]`` with ``skip_output_reshape``).

What ComfyUI really passes, and what we read from it (checked against ComfyUI 0.30.0's engine in
tests/workflows/test_comfy_engine.py):

* token grid: Wan sets ``grid_sizes`` (post-patch T, H, W); the UNet's ``SpatialTransformer`` sets
  ``activations_shape`` (``[B, C, H, W]`` of its level). Other DiTs (Flux, SD3, HunyuanVideo, LTX, Qwen-Image)
  pass neither the grid nor the text length of their joint sequences, so for them the node also installs an
  ``apply_model`` wrapper (:func:`latent_wrapper`, ComfyUI's ``WrappersMP.APPLY_MODEL``) that sees the latent and
  the text context and leaves their shapes in ``transformer_options``; the grid is the latent's over the model's
  patch size, and the text sits where ComfyUI's own model code puts it (:data:`COMFY_TOKENS`: *before* the image
  in every joint family ComfyUI has, unlike diffusers' SD3 and HunyuanVideo). A call whose length these do not
  account for (Flux Kontext's reference latents, HunyuanVideo's extra text tokens) is handed on, with one
  warning per node;
* layer: ``block_index``, or the call's ordinal in the forward where the model sets none (SD3, LTX); step: the
  index of ``sigmas`` in ``sample_sigmas``, placed in the whole schedule when that is a ``KSamplerAdvanced``
  slice and the sigmas tell (:func:`schedule_span`); timestep: ``model_sampling.timestep(sigma)`` (0–1000
  scheduler units, what the methods' schedules expect);
* branch: ``cond_or_uncond`` (0 = cond, 1 = uncond, one entry per batch chunk).

Self-attention without a mask is served by the method; cross-attention by methods that edit it (maskmod);
everything else (masked calls, with one warning when the method would have served them; unknown layouts) goes to
the override that was installed before, or to ComfyUI's own attention. Chained attnproc nodes compose like ``attnproc.apply(pipe, [base, edit])`` (:func:`compose`).

Nothing here imports ComfyUI or diffusers.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

import torch

import attnproc
from attnproc.context import StepContext
from attnproc.layout import TokenLayout
from attnproc.families import FAMILIES
from attnproc.method import Composed, Edit, Method

log = logging.getLogger("attnproc.comfy")
OVERRIDE_KEY = "optimized_attention_override"
# ComfyUI's attention signature, in order: Qwen-Image passes its text mask positionally
_ARG_NAMES = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")

# ComfyUI's model classes (comfy.model_base; subclasses such as WAN22 match through their bases) -> our families,
# from the family records. "BaseModel" (SD 1.x / 2.x) counts only as the exact class: every model derives from it.
_COMFY_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.comfy_models}
# families whose token grid ComfyUI passes to the attention call, and the key it is read from
LAYOUT_FAMILIES = {"wan": "grid_sizes", "unet": "activations_shape"}
# families whose grid comes from the latent (latent_wrapper): where ComfyUI's model code puts the text in a joint
# sequence ("before": comfy/ldm/flux, mmdit, hunyuan_video, qwen_image concatenate text first; "none": LTX's
# self-attention holds video tokens only), and the (T, H, W) patch size when the model does not say
COMFY_TOKENS = {"flux": ("before", (1, 2, 2)), "sd3": ("before", (1, 2, 2)), "hunyuanvideo": ("before", (1, 2, 2)),
                "qwenimage": ("before", (1, 2, 2)), "ltx": ("none", (1, 1, 1))}
LATENT_KEY = "attnproc_latent"
WRAPPER_TYPE, WRAPPER_KEY = "apply_model", "attnproc_layout"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL


def family_from(model) -> str | None:
    """Our family name for a ComfyUI ``ModelPatcher`` (from ``model.model``'s class), or None if unknown."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    for cls in type(inner).__mro__:
        if cls.__name__ in _COMFY_FAMILIES and (cls is type(inner) or cls.__name__ != "BaseModel"):
            return _COMFY_FAMILIES[cls.__name__]
    return None


def _parts(method: Method) -> tuple[Method | None, list[Edit]]:
    if isinstance(method, Composed):
        return method.base, list(method.edits)
    if isinstance(method, Edit):
        return None, [method]
    return method, []


def compose(first: Method, then: Method) -> Method:
    """Two chained nodes as one method: at most one base (dense or sparse) and the edits around it in order, like
    ``attnproc.apply(pipe, [base, *edits])``."""
    base_a, edits_a = _parts(first)
    base_b, edits_b = _parts(then)
    if base_a is not None and base_a.name == "dense":  # dense then a sparse method: the sparse one
        base_a = None
    if base_a is not None and base_b is not None and base_b.name != "dense":
        raise ValueError(f"two base attention methods chained ({base_a.name!r}, then {base_b.name!r}): chain at "
                         "most one base method (dense, radial, gna, ...) and any number of edits (maskmod, ...)")
    base = base_a or base_b or attnproc.create("dense")
    return Composed(base, edits_a + edits_b)


def _serves_cross(method: Method) -> bool:
    return bool(_parts(method)[1])  # edits change cross-attention; base methods run it dense anyway


def comfy_unservable(cls: type[Method]) -> str | None:
    """Why ComfyUI's attention override cannot run a method class (it hands over only q, k and v, and a batch
    with one prompt for all its images), or None when it can. The one rule for the node pack and the runtime."""
    if cls.needs_prompt_batch:
        return ("needs a batch with one prompt per image (references, then the scene), which ComfyUI's "
                "conditioning does not give")
    if cls.needs_block_input or cls.needs_call_inputs or cls.create_state is not Method.create_state:
        return ("needs per-module state or the transformer block's input (or the module's projections and text "
                "context), which ComfyUI's attention override (q, k, v only) cannot provide")
    return None


def check_model(method: Method, family: str | None, model_class: str) -> None:
    """Refuse, when the node executes, a model the method cannot serve in ComfyUI (one clear error instead of a
    warning on every attention call)."""
    base, edits = _parts(method)
    from attnproc.errors import UnsupportedFamilyError
    from attnproc.families import describe_families

    for m in ([base] if base is not None else []) + edits:
        if m.families is not None and family not in m.families:
            raise UnsupportedFamilyError(
                f"method {m.name!r} does not support the model family {family!r} (ComfyUI model {model_class}); "
                f"supported families: {describe_families(m.families)}")
        reason = comfy_unservable(type(m))
        if reason is not None:
            from attnproc.workflows.comfy_steer import STEER_NODES  # (it imports this module)

            own = STEER_NODES.get(m.name)
            where = f"use its own node {own['node_id']!r} instead" if own else "use it through diffusers"
            raise ValueError(f"method {m.name!r} {reason}; {where}")
        if m.needs_layout and family not in LAYOUT_FAMILIES and family not in COMFY_TOKENS:
            served = ", ".join([*LAYOUT_FAMILIES, *COMFY_TOKENS])
            raise ValueError(f"method {m.name!r} needs the token grid, which attnproc reads in ComfyUI only for: "
                             f"{served}; this model is {model_class} (family {family!r})")


def sigma_percent(model_sampling) -> Callable[[float], float] | None:
    """sigma -> how much of the model's noise schedule lies before it (0 at the largest sigma, 1 at 0): the inverse
    of ComfyUI's ``model_sampling.percent_to_sigma`` (decreasing), by bisection; remembered per sigma."""
    to_sigma = getattr(model_sampling, "percent_to_sigma", None)
    if to_sigma is None:
        return None
    known: dict[float, float] = {}

    def percent(sigma: float) -> float:
        if sigma <= 0:
            return 1.0
        if sigma not in known:
            low, high = 0.0, 1.0
            for _ in range(40):
                mid = (low + high) / 2
                low, high = (mid, high) if float(to_sigma(mid)) > sigma else (low, mid)
            known[sigma] = (low + high) / 2
        return known[sigma]

    return percent


def schedule_span(schedule: list[float], percent: Callable[[float], float]) -> tuple[int, int] | None:
    """``(offset, total)``: where a sampler's slice of sigmas lies in the whole schedule, read from the sigmas
    themselves when the schedule's steps are evenly spaced in the model's percent (ComfyUI's ``simple``
    scheduler): ``KSamplerAdvanced`` passes each sampler only its slice. None when the sigmas do not say: other
    spacings, or fewer than three schedule points (two fit any spacing)."""
    k = len(schedule) - 1
    points = list(enumerate(percent(s) for s in schedule))
    # a final 0 is the schedule's end, or an end forced early (force_full_denoise): try both
    for usable in ([points, points[:-1]] if schedule[-1] == 0 else [points]):
        if len(usable) < 3 or usable[-1][1] - usable[0][1] <= 1e-6:
            continue
        total = round((usable[-1][0] - usable[0][0]) / (usable[-1][1] - usable[0][1]))
        offset = round(usable[0][1] * total)
        if total >= k and offset + k <= total and all(abs(p * total - (offset + j)) <= 0.25 for j, p in usable):
            return offset, total
    return None


def step_from(transformer_options: dict, model_sampling=None,
              percent: Callable[[float], float] | None = None, on_restart: Callable[[], None] | None = None
              ) -> StepContext | None:
    """The denoising step: the index of ``sigmas`` (the current sigma) within ``sample_sigmas``; when that is a
    slice of a longer schedule (``KSamplerAdvanced``), the index and length in the whole one, from ``percent``
    (:func:`sigma_percent`, :func:`schedule_span`), or ``on_restart()`` is called and the slice's are used. The
    timestep in 0–1000 scheduler units from the model's own ``model_sampling`` (NaN when it is unknown)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    sigma = torch.as_tensor(sigmas).flatten()[:1].float()
    current = float(sigma[0])
    schedule = transformer_options.get("sample_sigmas")
    index = num = None
    if schedule is not None:
        schedule = torch.as_tensor(schedule).flatten().float()
        num = max(int(schedule.numel()) - 1, 1)  # the last sigma is the end, not a step
        close = torch.isclose(schedule, torch.tensor(current), rtol=1e-4, atol=1e-6).nonzero()
        index = int(close[0]) if len(close) else int((schedule - current).abs().argmin())
        index = min(index, num - 1)
        values = schedule.tolist()
        span = schedule_span(values, percent) if percent is not None and len(values) > 1 else None
        if span is not None:
            index, num = span[0] + index, span[1]
        elif on_restart is not None and percent is not None and (percent(values[0]) > 1e-3 or values[-1] != 0):
            on_restart()
    timestep = math.nan
    if model_sampling is not None:
        timestep = float(model_sampling.timestep(sigma).flatten()[0])
    return StepContext(index=index, num_steps=num, timestep=timestep, branch=_branch(transformer_options),
                       denoiser="diffusion_model")


def _branches(transformer_options: dict) -> tuple[str, ...] | None:
    cou = transformer_options.get("cond_or_uncond")
    return tuple("cond" if c == 0 else "uncond" for c in cou) if cou else None


def _branch(transformer_options: dict) -> str | None:
    names = _branches(transformer_options)
    if not names:
        return None
    return names[0] if len(names) == 1 else "batched"


def latent_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                   **kwargs):
    """ComfyUI ``APPLY_MODEL`` wrapper: leaves the latent's shape, the text context's length, the model's patch
    size and its number of double blocks in (a copy of) ``transformer_options`` for :func:`layout_from`."""
    model = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patchifier", None), "patch_size", None)
    info = {"shape": tuple(int(n) for n in x.shape),
            "text_len": int(c_crossattn.shape[1]) if c_crossattn is not None and c_crossattn.ndim == 3 else None,
            "patch": tuple(patch) if isinstance(patch, (list, tuple)) else patch,
            "double_blocks": len(getattr(model, "double_blocks", ()) or ()),
            "calls": {"self": -1}}  # this forward's self/joint attention calls so far (layer_from)
    options = {**transformer_options, LATENT_KEY: info}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def _latent_grid(info: dict, default_patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Post-patch (T, H, W) of a ``[B, C, H, W]`` or ``[B, C, T, H, W]`` latent (ComfyUI pads to the patch)."""
    patch = info.get("patch")
    if isinstance(patch, int):
        patch = (1, patch, patch)
    patch = tuple(patch) if patch is not None and len(patch) == 3 else default_patch
    dims = info["shape"][2:]
    dims = (1, *dims) if len(dims) == 2 else tuple(dims)
    return tuple(-(-int(d) // int(p)) for d, p in zip(dims, patch))


def visual_tokens(transformer_options: dict, family: str | None) -> int:
    """How many image/video tokens the latent makes (a large number when unknown)."""
    info = transformer_options.get(LATENT_KEY)
    if info is None or family not in COMFY_TOKENS:
        return 1 << 62
    return math.prod(_latent_grid(info, COMFY_TOKENS[family][1]))


def _joint_layout(transformer_options: dict, family: str | None, q_len: int, k_len: int) -> TokenLayout | None:
    info = transformer_options.get(LATENT_KEY)
    if info is None or family not in COMFY_TOKENS:
        return None
    text_position, patch = COMFY_TOKENS[family]
    grid = _latent_grid(info, patch)
    visual = math.prod(grid)
    branches = _branches(transformer_options)
    if q_len == visual:  # self-attention over the visual tokens (LTX), or its cross-attention
        cross = k_len != q_len
        return TokenLayout(*grid, text_len=k_len if cross else 0, text_position="separate" if cross else "none",
                           branches=branches)
    if text_position == "none" or k_len != q_len:
        return None
    text = q_len - visual
    img_slice = transformer_options.get("img_slice")  # Flux/HunyuanVideo single blocks: [text, text + image]
    known = img_slice[0] if img_slice is not None else info.get("text_len")
    if text <= 0 or known != text:  # extra tokens (reference latents, added text) we cannot place
        return None
    return TokenLayout(*grid, text_len=text, text_position=text_position, branches=branches)


def layer_from(transformer_options: dict, self_call: bool = True) -> int | None:
    """A layer index unique across block types: single-stream blocks count on after the double-stream ones
    (ComfyUI restarts ``block_index`` at 0 for them). Models that set no ``block_index`` (SD3's MMDiT, LTX) get
    the ordinal of the self/joint attention call in this forward (counted in :func:`latent_wrapper`'s record;
    a cross-attention call gets its block's): unique per call site, equal to the block index when each block
    has one self-attention (SD3.5's second, image-only attention counts as one more)."""
    block = transformer_options.get("block_index")
    info = transformer_options.get(LATENT_KEY) or {}
    if block is None:
        calls = info.get("calls")
        if calls is None:
            return None
        if self_call:
            calls["self"] += 1
        return max(calls["self"], 0)
    if transformer_options.get("block_type") == "single":
        return int(block) + int(info.get("double_blocks", 0))
    return int(block)


def layout_from(transformer_options: dict, q_len: int, k_len: int | None = None,
                family: str | None = None) -> TokenLayout | None:
    """The token layout of an attention call of ``q_len`` queries (``k_len`` keys: cross-attention when it
    differs), or None when what ComfyUI passes does not account for every query token."""
    given = transformer_options.get("attnproc_layout")
    grid = None
    if isinstance(given, (TokenLayout, dict)):
        layout = given if isinstance(given, TokenLayout) else TokenLayout(**given)
        return layout if layout.seq_len == q_len else None
    if LATENT_KEY in transformer_options:
        return _joint_layout(transformer_options, family, q_len, q_len if k_len is None else k_len)
    sizes = transformer_options.get("grid_sizes")  # Wan: post-patch (T, H, W)
    if sizes is not None and len(sizes) == 3 and math.prod(int(s) for s in sizes) == q_len:
        grid = tuple(int(s) for s in sizes)
    shape = transformer_options.get("activations_shape")  # UNet SpatialTransformer: [B, C, H, W] of its level
    if grid is None and shape is not None and len(shape) == 4 and int(shape[2]) * int(shape[3]) == q_len:
        grid = (1, int(shape[2]), int(shape[3]))
    if grid is None:
        return None
    cross = k_len is not None and k_len != q_len
    return TokenLayout(*grid, text_len=k_len if cross else 0, text_position="separate" if cross else "none",
                       branches=_branches(transformer_options))


def _qkv_bhsd(q, k, v, heads: int, skip_reshape: bool, enable_gqa: bool):
    """q, k, v as ``[B, H, S, D]``; grouped-query keys/values (``enable_gqa``) repeated to the query heads, which
    is what SDPA's ``enable_gqa`` computes."""
    if skip_reshape:
        qh, kh, vh = q, k, v
    else:
        dim_head = q.shape[-1] // heads
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], -1, dim_head).transpose(1, 2) for t in (q, k, v))
    if kh.shape[1] != qh.shape[1]:
        if not enable_gqa or qh.shape[1] % kh.shape[1]:
            raise ValueError(f"{qh.shape[1]} query heads and {kh.shape[1]} key heads without enable_gqa")
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    return qh, kh, vh


def make_override(method: Method, previous: Callable | None = None, family: str | None = None,
                  model_sampling=None) -> Callable:
    """An ``optimized_attention_override`` running ``method``; ``previous`` (an override already installed) gets
    every call this one does not serve. ``family`` is the model's family, ``model_sampling`` ComfyUI's
    sigma↔timestep conversion of the model (None: timestep unknown)."""
    serves_cross = _serves_cross(method)
    serves_self = not (method.name == "dense" and not serves_cross)  # plain dense: a masked call loses nothing
    percent = sigma_percent(model_sampling)
    video_only = COMFY_TOKENS.get(family, ("",))[0] == "none"  # LTX: every self-attention is over the video
    warned = set()

    def warn_once(key: str, message: str, *args) -> None:
        if key not in warned:
            warned.add(key)
            log.warning(message, *args)

    def unplaced(q_len: int) -> None:
        warn_once("unplaced", "attnproc %s: %d query tokens that the %s model's latent and text do not account "
                  "for (reference latents, added text tokens, or LTX keyframe guides); such calls run ComfyUI's "
                  "attention", method.name, q_len, family)

    def masked() -> None:
        warn_once("masked", "attnproc %s: ComfyUI passes an attention mask to some attention calls of this %s "
                  "model (a padded text context, or guide attenuation); masked calls run ComfyUI's attention, "
                  "without %s", method.name, family, method.name)

    def restarted() -> None:
        warn_once("restart", "attnproc %s: this sampler runs a part of a schedule (KSamplerAdvanced split, or "
                  "denoise < 1) whose whole length its sigmas do not tell (a scheduler that does not space steps "
                  "evenly, e.g. karras, or fewer than 3 sigmas): step rules (dense_first_steps) count from this "
                  "sampler's first step", method.name)

    def fallback(original, args, kwargs):
        if previous is not None:
            return previous(original, *args, **kwargs)
        return original(*args, **kwargs)

    def override(original: Callable, *args, **kwargs):
        named = dict(zip(_ARG_NAMES, args))
        named.update({k: kwargs[k] for k in _ARG_NAMES if k in kwargs})
        q, k, v, heads = (named.get(n) for n in _ARG_NAMES[:4])
        opts = kwargs.get("transformer_options") or {}
        skip_reshape = bool(named.get("skip_reshape", False))
        if q is None or k is None or v is None or heads is None:
            return fallback(original, args, kwargs)
        seq_axis = 2 if skip_reshape else 1
        q_len, k_len = q.shape[seq_axis], k.shape[seq_axis]
        layer = layer_from(opts, self_call=q_len == k_len)
        if video_only and q_len != k_len and k_len != (opts.get(LATENT_KEY) or {}).get("text_len", k_len):
            unplaced(q_len)  # keys neither the text nor the queries: LTX's guide attention split by query group
            return fallback(original, args, kwargs)
        if named.get("mask") is not None:  # never served as if unmasked
            if serves_cross if q_len != k_len else serves_self:
                masked()
            return fallback(original, args, kwargs)
        if q_len != k_len and not serves_cross:  # cross-attention: the base methods run it dense
            return fallback(original, args, kwargs)
        layout = layout_from(opts, q_len, k_len, family)
        if layout is None and method.needs_layout:
            if visual_tokens(opts, family) < q_len or (video_only and q_len == k_len):  # tokens we cannot place
                unplaced(q_len)
            return fallback(original, args, kwargs)
        qh, kh, vh = _qkv_bhsd(q, k, v, heads, skip_reshape, bool(kwargs.get("enable_gqa", False)))
        joint = layout is not None and layout.text_position in ("before", "after")
        site = attnproc.Site(family=family, denoiser="diffusion_model", name=None, index=layer, layer=layer,
                             kind="joint" if joint else "self" if q_len == k_len else "cross", layout=layout,
                             step=step_from(opts, model_sampling, percent, restarted))
        out = method.attention(qh, kh, vh, site, scale=kwargs.get("scale")).to(q.dtype)
        if named.get("skip_output_reshape", False):
            return out
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)

    override.attnproc_method = method
    override.attnproc_previous = previous
    return override


def _option_infos(method: str) -> dict:
    return {o.name: o for o in next(m for m in attnproc.methods() if m.name == method).options}


TRISTATE = {"auto": None, "on": True, "off": False}


def parse_widget_options(method: str, values: dict[str, Any]) -> dict:
    """Node widget values → method options: JSON strings for ``any``-typed options (empty = default) and for
    numeric options whose default is "automatic" (None); "auto/on/off" for booleans whose default is the
    family's (None)."""
    infos = _option_infos(method)
    options = {}
    for name, value in values.items():
        info = infos.get(name)
        if info is None:
            continue
        if info.type == "bool" and info.default is None and isinstance(value, str):
            if value not in TRISTATE:
                raise ValueError(f"option {name!r} of method {method!r}: choose one of auto, on, off; got {value!r}")
            if TRISTATE[value] is not None:
                options[name] = TRISTATE[value]
            continue
        if info.choices is not None and info.default is None and value == "auto":
            continue  # the method chooses
        if info.choices is not None:
            options[name] = value
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
    """``model.clone()`` with ``method`` installed as the attention override.

    An attnproc override already installed (an attnproc node earlier in the chain) is composed with this one
    (:func:`compose`); any other override gets the calls this one does not serve. Refuses models the method
    cannot serve (:func:`check_model`)."""
    instance = attnproc.create(method, **parse_widget_options(method, widget_values))
    return install(model, instance)


def install(model, instance: Method):
    """``model.clone()`` with ``instance`` as the override (composed with an attnproc override already there)."""
    options = dict(model.model_options.get("transformer_options", {}))
    previous = options.get(OVERRIDE_KEY)
    if getattr(previous, "attnproc_method", None) is not None:
        instance, previous = compose(previous.attnproc_method, instance), previous.attnproc_previous
    family = family_from(model)
    check_model(instance, family, type(getattr(model, "model", None)).__name__)
    get = getattr(model, "get_model_object", None)
    sampling = get("model_sampling") if get is not None else None
    patched = model.clone()
    options[OVERRIDE_KEY] = make_override(instance, previous, family, sampling)
    patched.model_options["transformer_options"] = options
    if family in COMFY_TOKENS and hasattr(patched, "add_wrapper_with_key"):
        patched.remove_wrappers_with_key(WRAPPER_TYPE, WRAPPER_KEY)  # chained attnproc nodes: one wrapper
        patched.add_wrapper_with_key(WRAPPER_TYPE, WRAPPER_KEY, latent_wrapper)
    return patched


# ----------------------------------------------------------------------------- maskmod as a ComfyUI node
def add_region(regions: list | None, phrase: str, mask: torch.Tensor) -> list[dict]:
    """A region list (``ATTNPROC_REGIONS``) with one more region: ``phrase`` and a ComfyUI ``MASK``
    (``[B, H, W]`` in [0, 1]; one mask, or one per video frame). The input list is not changed."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError("region phrase: give a part of the prompt (it is empty)")
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise ValueError(f"region mask: a ComfyUI MASK [B, H, W] is expected, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.float().cpu()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    return [*(regions or []), {"phrase": phrase.strip(), "mask": mask}]


# maskmod in ComfyUI: the tokenizer (key of ``clip.tokenize``'s result) whose tokens are the model's text context;
# None: the first (SD1.x/SDXL's CLIPs share one layout, Wan has only umt5xxl). Families whose context mixes
# encoders or crops a chat template (SD3, HunyuanVideo, Qwen-Image) are refused rather than bound to wrong tokens.
MASKMOD_CONTEXT_TOKENIZER = {"unet": None, "wan": None, "flux": "t5xxl"}


def phrase_tokens(clip, prompt: str, phrase: str, key: str | None = None) -> list[int]:
    """The positions of ``phrase``'s tokens in the text context the model gets for ``prompt``, found with the
    CLIP object's own tokenizer (``clip.tokenize(..., return_word_ids=True)``; ``key`` names the encoder whose
    tokens make the context, default the first): token chunks are concatenated in the context, so a position is
    the index in the flattened chunks. Special and padding tokens (word id 0) never match."""
    prompt_tokens = clip.tokenize(prompt, return_word_ids=True)
    phrase_tokens_ = clip.tokenize(phrase, return_word_ids=True)
    if key is not None and key not in prompt_tokens:
        raise ValueError(f"maskmod: this model's text context comes from the {key!r} tokenizer, which the CLIP "
                         f"input does not have ({sorted(prompt_tokens)}): connect the model's own text encoder")
    key = key or next(iter(prompt_tokens))
    flat = [t for chunk in prompt_tokens[key] for t in chunk]
    wanted = [t[0] for chunk in phrase_tokens_[key] for t in chunk if t[2] != 0]
    n = len(wanted)
    starts_word = _word_start_rule(clip, key, flat)
    for i in range(len(flat) - n + 1):
        window = flat[i:i + n]
        if n and starts_word(i) and all(w[2] != 0 for w in window) and [w[0] for w in window] == wanted:
            return list(range(i, i + n))
    raise ValueError(f"maskmod: the phrase {phrase!r} is not part of the prompt {prompt!r} (as the text encoder "
                     "tokenizes it); use the prompt given to CLIPTextEncode")


def _word_start_rule(clip, key: str, flat: list) -> Callable[[int], bool]:
    """Whether position ``i`` of the flattened tokens starts a word, so a phrase never matches inside one.

    ComfyUI's word ids number weight segments, not words (a plain prompt is one segment), so the rule reads the
    tokens themselves from the Hugging Face tokenizer inside the CLIP object: CLIP's BPE ends a word with
    ``</w>``, sentencepiece (T5) starts one with ``▁``. Without such a tokenizer, a new word id is the only sign."""
    outer = getattr(clip, "tokenizer", None)
    inner = getattr(outer, key, None) or getattr(outer, f"clip_{key}", None)
    hf = getattr(inner, "tokenizer", None)
    to_text = getattr(hf, "convert_ids_to_tokens", None)

    def text(t) -> str:
        return to_text(int(t[0])) if to_text is not None and not torch.is_tensor(t[0]) else ""

    def starts_word(i: int) -> bool:
        if i == 0 or flat[i - 1][2] == 0 or flat[i - 1][2] != flat[i][2]:
            return True
        return text(flat[i - 1]).endswith("</w>") or text(flat[i]).startswith("\u2581")

    return starts_word


def patch_maskmod(model, clip, prompt: str, regions: list | None, **widget_values):
    """``model.clone()`` with maskmod: each region's phrase bound to its token positions with ``clip``."""
    if not regions:
        raise ValueError("maskmod: connect at least one region (attnproc: region node: a phrase and a MASK)")
    family = family_from(model)
    if family not in MASKMOD_CONTEXT_TOKENIZER:
        raise ValueError(f"maskmod in ComfyUI binds phrases for the families {sorted(MASKMOD_CONTEXT_TOKENIZER)}; "
                         f"this model is {type(getattr(model, 'model', None)).__name__} (family {family!r}), whose "
                         "text context mixes encoders or crops a template: use maskmod through diffusers with "
                         "'tokens' per region")
    key = MASKMOD_CONTEXT_TOKENIZER[family]
    bound = [{**r, "tokens": phrase_tokens(clip, prompt, r["phrase"], key)} for r in regions]
    options = parse_widget_options("maskmod", widget_values)
    options.pop("regions", None)
    instance = attnproc.create("maskmod", **{**options, "regions": bound, "prompt": prompt})
    return install(model, instance)
