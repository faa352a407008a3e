"""Family adapters: the only code that knows how each diffusers model family lays out its attention.

An adapter says which attention modules to patch and of what kind (self / cross / joint), how to read the
visual token grid from the denoiser's forward inputs, and how a joint sequence orders text and visual tokens.
Everything else (projections, norms, RoPE) stays in the stock processors, which we wrap.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import UnsupportedFamilyError, UnsupportedModelError
from .layout import TokenLayout

__all__ = ["Family", "FAMILIES", "family_named", "family_of", "denoiser_families", "describe_families",
           "attention_modules", "stock_processor_for", "UnsupportedModelError"]


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name (positional ones included)."""
    sig = inspect.signature(type(model).forward)
    bound = sig.bind_partial(model, *args, **kwargs)
    return dict(bound.arguments)


def _mask_valid(mask: torch.Tensor | None) -> int | None:
    """Valid text length from a [B, L] padding mask, if all samples agree."""
    if mask is None:
        return None
    counts = mask.reshape(mask.shape[0], -1).bool().sum(dim=1)
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def _grid_5d(x: torch.Tensor, pt: int, ph: int, pw: int, frames_dim: int = 2) -> tuple[int, int, int]:
    f = x.shape[frames_dim]
    h, w = x.shape[-2], x.shape[-1]
    return (f // pt, h // ph, w // pw)


def _kind_by_context(module, has_context: bool) -> str | None:
    return "cross" if has_context else "self"


def _kind_joint(module, has_context: bool) -> str | None:
    return "joint"


@dataclass(frozen=True)
class Family:
    """Everything attnproc knows about one diffusers model family: the one record to add for a new family.

    ``name`` is the one vocabulary word used everywhere (errors, ``Site.family``, method ``families``);
    ``aliases`` are other words users type for it (the tiny pipelines' names, model versions). ``title`` names
    the models it covers; ``comfy_models`` the ComfyUI model classes (``comfy.model_base``) of the family.
    """

    name: str
    title: str
    model_classes: tuple[str, ...]
    kind_of: Callable[[str, torch.nn.Module], str | None]
    grid_of: Callable[[torch.nn.Module, dict], tuple[tuple[int, int, int], int | None]]
    aliases: tuple[str, ...] = ()
    comfy_models: tuple[str, ...] = ()
    # kind of a module seen without its name (plain set_attn_processor): (module, got a text context) -> kind
    kind_without_name: Callable[[torch.nn.Module, bool], str | None] = _kind_by_context
    # a pipeline-level variant that changes method defaults ("wan22": two experts), or None
    variant_of: Callable[[Any], str | None] | None = None
    joint_text: str = "none"  # where text sits in a joint sequence: "before" | "after"
    batched_cfg: bool = True  # pipelines run cond and uncond in one batch (vs. two passes)
    timestep_scale: float = 1.0  # pipeline passes timestep / scale to the model
    multiscale: bool = False  # UNet: attention runs at several resolutions
    # context parallelism: whether diffusers' CP plan shards the cross-attention text (Wan keeps it whole)
    cp_text_sharded: bool = True
    legacy_processors: dict[str, str] = field(default_factory=dict)  # kind -> stock class for legacy Attention

    # ---- layout of one attention call ------------------------------------------------------------------
    def site_layout(self, base: TokenLayout, kind: str, q_len: int, kv_len: int,
                    text_valid: int | None = None) -> TokenLayout:
        """The layout of a call with ``q_len`` queries and ``kv_len`` keys, given the forward's base layout
        (visual grid at full resolution, batch branches) and the valid text length if known."""
        grid = base.grid
        if self.multiscale:
            grid = _unet_level(base.grid, q_len if kind != "joint" else None)
        visual = grid[0] * grid[1] * grid[2]
        if kind == "joint":
            text = q_len - visual
            if text < 0 or kv_len != q_len:
                raise RuntimeError(f"{self.name}: joint attention over {q_len} queries / {kv_len} keys does not fit "
                                   f"the visual grid {grid} ({visual} tokens)")
            return TokenLayout(*grid, text_len=text, text_position=self.joint_text if text else "none",
                               text_valid=text_valid if text and text_valid is not None and text_valid <= text else None,
                               branches=base.branches)
        if q_len != visual:
            raise RuntimeError(f"{self.name}: {kind}-attention over {q_len} queries does not match the visual grid "
                               f"{grid} ({visual} tokens)")
        if kind == "cross":
            valid = text_valid if text_valid is not None and text_valid <= kv_len else None
            return TokenLayout(*grid, text_len=kv_len, text_position="separate", text_valid=valid,
                               branches=base.branches)
        return TokenLayout(*grid, branches=base.branches)

    def block_name(self, module_name: str) -> str:
        """The transformer block that owns an attention module (its parent), for block-input hooks."""
        return module_name.rsplit(".", 1)[0] if "." in module_name else ""


def _unet_level(grid: tuple[int, int, int], q_len: int | None) -> tuple[int, int, int]:
    """The UNet resolution level whose token count is ``q_len`` (each level halves H and W, rounding up)."""
    f, h, w = grid
    for _ in range(8):
        if q_len is None or f * h * w == q_len:
            return (f, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    raise RuntimeError(f"unet: no resolution level of the latent grid {grid} has {q_len} tokens")


# ---- per-family layout readers ---------------------------------------------------------------------------
def _unet_grid(model, a):
    x = a["sample"]
    return (1, x.shape[-2], x.shape[-1]), _mask_valid(a.get("encoder_attention_mask"))


def _sd3_grid(model, a):
    p = model.config.patch_size
    x = a["hidden_states"]
    return (1, x.shape[-2] // p, x.shape[-1] // p), None


def _flux_grid(model, a):
    ids = a.get("img_ids")
    x = a["hidden_states"]
    if ids is None:
        raise RuntimeError("flux: cannot read the image grid without img_ids")
    ids = ids[0] if ids.ndim == 3 else ids
    frames = int(torch.unique(ids[:, 0]).numel())
    h = int(ids[:, 1].max().item()) + 1
    w = int(ids[:, 2].max().item()) + 1
    if frames * h * w != x.shape[1]:
        raise RuntimeError(
            f"flux: img_ids describe {frames}x{h}x{w} tokens but hidden_states has {x.shape[1]} (not one grid: e.g. "
            "Flux Kontext's reference-image tokens appended to the generated image's); methods that need the "
            "token layout do not serve such inputs yet, methods that need none (dense, steering) do")
    return (frames, h, w), None


def _wan_grid(model, a):
    pt, ph, pw = model.config.patch_size
    return _grid_5d(a["hidden_states"], pt, ph, pw), None


def _hunyuan_grid(model, a):
    p, pt = model.config.patch_size, model.config.patch_size_t
    return _grid_5d(a["hidden_states"], pt, p, p), _mask_valid(a.get("encoder_attention_mask"))


def _cogvideox_grid(model, a):
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    x = a["hidden_states"]  # [B, F, C, H, W]
    return ((x.shape[1] + pt - 1) // pt, x.shape[-2] // p, x.shape[-1] // p), None


def _ltx_grid(model, a):
    f, h, w = a.get("num_frames"), a.get("height"), a.get("width")
    if None in (f, h, w):
        raise RuntimeError("ltx: the transformer needs num_frames, height and width to know its token grid")
    return (int(f), int(h), int(w)), _mask_valid(a.get("encoder_attention_mask"))


def _qwen_grid(model, a):
    shapes = a.get("img_shapes")
    if not shapes:
        raise RuntimeError("qwenimage: cannot read the image grid without img_shapes")
    first = shapes[0]
    first = first[0] if isinstance(first, list) else first
    f, h, w = (int(s) for s in first)
    return (f, h, w), _mask_valid(a.get("encoder_hidden_states_mask"))


# ---- per-family module kinds ---------------------------------------------------------------------------
def _by_suffix(table: dict[str, str], prefixes: tuple[str, ...] = ()):
    def kind_of(name: str, module) -> str | None:
        if prefixes and not name.startswith(prefixes):
            return None
        return table.get(name.rsplit(".", 1)[-1])
    return kind_of


def _unet_kind(name: str, module) -> str | None:
    return "cross" if getattr(module, "is_cross_attention", False) else "self"


def _sd3_kind(module, has_context: bool) -> str | None:
    return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "self"


def _hunyuan_kind(module, has_context: bool) -> str | None:
    return "joint" if getattr(module, "norm_q", None) is not None else None  # no norm_q: the text refiner


def _wan_variant(target) -> str | None:
    return "wan22" if isinstance(getattr(target, "transformer_2", None), torch.nn.Module) else None


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("unet", "Stable Diffusion 1.x/2.x, SDXL (UNet2DConditionModel)", ("UNet2DConditionModel",), _unet_kind,
           _unet_grid, aliases=("sd15", "sdxl"), comfy_models=("BaseModel", "SDXL", "SDXLRefiner"),
           multiscale=True, legacy_processors={"self": "AttnProcessor2_0", "cross": "AttnProcessor2_0"}),
    Family("sd3", "Stable Diffusion 3/3.5 (SD3Transformer2DModel)", ("SD3Transformer2DModel",),
           _by_suffix({"attn": "joint", "attn2": "self"}), _sd3_grid, aliases=("sd35",), comfy_models=("SD3",),
           kind_without_name=_sd3_kind, joint_text="after",
           legacy_processors={"joint": "JointAttnProcessor2_0", "self": "JointAttnProcessor2_0"}),
    Family("flux", "Flux.1 (FluxTransformer2DModel)", ("FluxTransformer2DModel",), _by_suffix({"attn": "joint"}),
           _flux_grid, aliases=("flux1",), comfy_models=("Flux",), kind_without_name=_kind_joint,
           joint_text="before", batched_cfg=False, timestep_scale=1000.0),
    Family("wan", "Wan 2.1 / 2.2, both experts (WanTransformer3DModel)", ("WanTransformer3DModel",),
           _by_suffix({"attn1": "self", "attn2": "cross"}), _wan_grid, aliases=("wan21", "wan22"),
           comfy_models=("WAN21",), variant_of=_wan_variant, batched_cfg=False, cp_text_sharded=False),
    Family("hunyuanvideo", "HunyuanVideo (HunyuanVideoTransformer3DModel)", ("HunyuanVideoTransformer3DModel",),
           _by_suffix({"attn": "joint"}, prefixes=("transformer_blocks.", "single_transformer_blocks.")),
           _hunyuan_grid, aliases=("hunyuan",), comfy_models=("HunyuanVideo",), kind_without_name=_hunyuan_kind,
           joint_text="after", batched_cfg=False, legacy_processors={"joint": "HunyuanVideoAttnProcessor2_0"}),
    Family("cogvideox", "CogVideoX (CogVideoXTransformer3DModel)", ("CogVideoXTransformer3DModel",),
           _by_suffix({"attn1": "joint"}), _cogvideox_grid, aliases=("cogvideo",), kind_without_name=_kind_joint,
           joint_text="before", legacy_processors={"joint": "CogVideoXAttnProcessor2_0"}),
    Family("ltx", "LTX-Video (LTXVideoTransformer3DModel)", ("LTXVideoTransformer3DModel",),
           _by_suffix({"attn1": "self", "attn2": "cross"}), _ltx_grid, aliases=("ltxv", "ltxvideo"),
           comfy_models=("LTXV",)),
    Family("qwenimage", "Qwen-Image (QwenImageTransformer2DModel)", ("QwenImageTransformer2DModel",),
           _by_suffix({"attn": "joint"}), _qwen_grid, aliases=("qwen",), comfy_models=("QwenImage",),
           kind_without_name=_kind_joint, joint_text="before", batched_cfg=False, timestep_scale=1000.0,
           legacy_processors={"joint": "QwenDoubleStreamAttnProcessor2_0"}),
]}
_BY_WORD = {word: f for f in FAMILIES.values() for word in (f.name, *f.aliases)}


def describe_families(names) -> str:
    """``"wan (Wan 2.1 / 2.2 ...), flux (Flux.1 ...)"``: our names with what they cover, for messages."""
    return ", ".join(f"{n} ({FAMILIES[n].title})" if n in FAMILIES else repr(n) for n in names)


def family_named(word: str) -> Family:
    """The family a user's word names: its name or an alias (``"wan21"`` and ``"wan22"`` are ``wan``)."""
    family = _BY_WORD.get(word.lower()) if isinstance(word, str) else None
    if family is None:
        valid = "; ".join(f"{f.name}" + (f" (also {', '.join(f.aliases)})" if f.aliases else "")
                          for f in FAMILIES.values())
        raise UnsupportedFamilyError(f"unknown family {word!r}; valid: {valid}")
    return family


def supported_models() -> str:
    return "; ".join(f.title for f in FAMILIES.values())


def denoiser_families(target) -> list[tuple[str, str | None]]:
    """``[(family, variant)]`` for each denoiser of ``target`` (a pipeline or a model) that has an adapter."""
    models = [target] if isinstance(target, torch.nn.Module) else [
        getattr(target, n, None) for n in ("unet", "transformer", "transformer_2")]
    out = []
    for m in models:
        if not isinstance(m, torch.nn.Module):
            continue
        try:
            family = family_of(m)
        except UnsupportedModelError:  # apply() itself reports models without an adapter
            continue
        variant = None if isinstance(target, torch.nn.Module) or family.variant_of is None else \
            family.variant_of(target)
        out.append((family.name, variant))
    return out


def family_of(model: torch.nn.Module) -> Family:
    """The adapter for a denoiser, or a clear error naming the supported families."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES.values():
        if names.intersection(family.model_classes):
            return family
    raise UnsupportedModelError(f"attnproc has no adapter for {type(model).__name__}; supported denoisers: "
                                f"{supported_models()}")


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every module of ``model`` that runs an attention processor, in registration (execution) order."""
    return [(name, m) for name, m in model.named_modules()
            if name and hasattr(m, "processor") and hasattr(m, "set_processor")]


def stock_processor_for(module: torch.nn.Module, family: Family | None, kind: str | None):
    """A fresh stock processor for ``module`` (used when our processor was set without wrapping one)."""
    default_cls = getattr(type(module), "_default_processor_cls", None)
    if default_cls is not None:
        return default_cls()
    from diffusers.models import attention_processor as ap
    from diffusers.models.transformers import transformer_hunyuan_video as hv
    from diffusers.models.transformers import transformer_qwenimage as qwen

    classes = {"AttnProcessor2_0": ap.AttnProcessor2_0, "JointAttnProcessor2_0": ap.JointAttnProcessor2_0,
               "CogVideoXAttnProcessor2_0": ap.CogVideoXAttnProcessor2_0,
               "HunyuanVideoAttnProcessor2_0": hv.HunyuanVideoAttnProcessor2_0,
               "QwenDoubleStreamAttnProcessor2_0": qwen.QwenDoubleStreamAttnProcessor2_0}
    if family is not None and kind in family.legacy_processors:
        return classes[family.legacy_processors[kind]]()
    plain = (getattr(module, "norm_q", None) is None and getattr(module, "added_kv_proj_dim", None) is None
             and not getattr(module, "pre_only", False))
    if plain:  # a plain legacy Attention runs AttnProcessor2_0 in every family (UNet, text refiners)
        return ap.AttnProcessor2_0()
    raise RuntimeError(
        f"cannot tell which stock processor this {type(module).__name__} module uses; pass family=... "
        f"({', '.join(FAMILIES)}) to attnproc.processor(), or use attnproc.apply(pipe, method, ...)")


def module_kind(module: torch.nn.Module, family: Family | None, has_context: bool) -> str | None:
    """Kind of a module seen without its name (plain set_attn_processor use); ``None`` for attention that is not
    over visual tokens (e.g. HunyuanVideo's text refiner). ``has_context``: the call got encoder_hidden_states."""
    return _kind_by_context(module, has_context) if family is None else family.kind_without_name(module, has_context)
