"""SLA, Sparse-Linear Attention (thu-ml/SLA, arXiv 2509.24006): exact softmax over each query block's top-k key
blocks plus a learnable projection of a linear attention. The projection ``proj_l`` (one ``D x D + D`` linear
per attention module) starts at zero, so an untrained SLA *is* plain block-sparse attention; it only pays off
after fine-tuning (``attnproc finetune``).

The paper and the two released code versions disagree (``shared/methods/sparse-sla-rectified-agent.md`` §1);
both code semantics are selectable:

* ``variant="main"`` (upstream ``main``, vendored by TurboDiffusion): ``O = Os + proj(Ol)`` with ``Ol`` a linear
  attention over **all** keys, ``phi(q) (phi(K)^T V) / (1e-5 + phi(q) . sum phi(K))``;
* ``variant="sla1"`` (branch ``SLA-1``): ``Ol`` over the key blocks the query block did **not** select, without
  an epsilon, and 0 where every block is selected.

``Os`` is softmax attention (scale ``D**-0.5``) over the selected key blocks, run by
:func:`attnproc.kernels.block_sparse_attention` (with its backward). The block map (upstream ``get_block_map``):
mean-pool q over ``block_q`` tokens and the smoothed keys ``k - mean_seq(k)`` over ``block_k`` tokens (a ragged
last block averaged over its real tokens), score ``pool(q) . pool(k~)^T`` without scale or softmax (same
ranking), keep ``min(nK, floor(topk * nK))`` key blocks per query block.

    out = sla_attention(q, k, v, proj.weight, proj.bias, topk=0.1)            # [B, H, L, D] -> [B, H, L, D]
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from attnproc.kernels import (
    BACKENDS,
    block_sparse_attention,
    linear_attention,
    num_blocks,
    pad_to_blocks,
    resolve_feature_map,
)
from attnproc.options import option
from attnproc.registry import register
from attnproc.schedule import Schedule
from attnproc.sparse.base import SparseMethod


__all__ = ["sla_attention", "sla_block_map", "selected_key_blocks", "sla_visual_attention", "SLAConfig",
           "SLA_DEFAULTS", "SUPPORTED_FAMILIES", "VARIANTS", "FEATURE_MAPS", "MAIN_EPS", "save_sla_weights",
           "load_sla_weights", "model_fingerprint", "SLAWeightsError", "auto_block_size", "SLA"]

VARIANTS = ("main", "sla1")
FEATURE_MAPS = ("softmax", "elu", "relu")
MAIN_EPS = 1e-5  # the ``main`` linear branch's denominator epsilon (``SLA-1`` has none)
# the video families, plus the image families of the shapes-world models (sd15: ``unet``, ``flux``)
SUPPORTED_FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "ltx", "flux", "unet")

# Per-family defaults (``None`` options resolve to these). TurboDiffusion trains Wan2.1 with topk 0.1 and 64/64
# blocks and runs SLA in every self-attention layer at every step (no dense warm-up); no other family has a
# reference setting, so they take Wan's (block sizes: see ``auto_block_size``).
SLA_DEFAULTS: dict[str, dict] = {
    fam: dict(topk=0.1, dense_first_steps=0.0, dense_first_layers=0) for fam in SUPPORTED_FAMILIES
}


# ---- the block map -----------------------------------------------------------------------------------------
def selected_key_blocks(num_key_blocks: int, topk: float) -> int:
    """How many key blocks each query block attends exactly: ``min(nK, floor(topk * nK))``; refuses 0 (the
    reference then divides 0 by 0 and returns NaN)."""
    n = min(num_key_blocks, int(topk * num_key_blocks))
    if n < 1:
        raise ValueError(
            f"topk={topk} selects no key block out of {num_key_blocks} (floor({topk} * {num_key_blocks}) = 0); "
            f"use topk >= {1 / num_key_blocks:.4g} or a smaller block_k")
    return n


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over runs of ``block`` tokens (the last run over its real tokens), summed in fp32 or better."""
    L = x.shape[2]
    n = num_blocks(L, block)
    acc = torch.promote_types(x.dtype, torch.float32)
    xp, _ = pad_to_blocks(x.to(acc), block)
    sums = xp.reshape(*x.shape[:2], n, block, x.shape[-1]).sum(3)
    counts = torch.full((n,), float(block), dtype=acc, device=x.device)
    counts[-1] = L - (n - 1) * block
    return (sums / counts[:, None]).to(x.dtype)


@torch.no_grad()
def sla_block_map(q: torch.Tensor, k: torch.Tensor, *, block_q: int = 64, block_k: int = 64,
                  topk: float = 0.5) -> torch.Tensor:
    """bool ``[B, H, ceil(L/block_q), ceil(L/block_k)]``: the key blocks each query block attends exactly.
    Computed in the input dtype like the reference; carries no gradient (the selection is discrete)."""
    ks = k - k.mean(dim=-2, keepdim=True)  # SageAttention's smooth-k
    score = _mean_pool(q, block_q) @ _mean_pool(ks, block_k).transpose(-1, -2)
    n_sel = selected_key_blocks(score.shape[-1], topk)
    idx = torch.topk(score, n_sel, dim=-1, sorted=False).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)


# ---- the two branches --------------------------------------------------------------------------------------
def _sparse_branch(q, k, v, block_map, bq, bk, scale, extra_k, extra_v, backend):
    if q.dtype == torch.float64:
        # the public kernel entry takes fp32/16/bf16 only; float64 (gradient checks) runs its gather backend,
        # which is pure torch and exact in any float dtype
        from attnproc.kernels._gather import gather_attention

        return gather_attention(q, k, v, block_map, bq, bk, scale, extra_k, extra_v, needs_grad=True)[0]
    return block_sparse_attention(q, k, v, block_map, (bq, bk), scale=scale, extra_k=extra_k, extra_v=extra_v,
                                  backend=backend)


def _complement_linear(q, k, v, block_map, bq, bk, phi):
    """``SLA-1``'s linear branch: per query block, linear attention over its non-selected key blocks only.

    Memory ``O(L / block * D * Dv)`` (one ``phi(K)^T V`` sum per key block and per query block), never
    ``L x L``."""
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    ct = torch.promote_types(q.dtype, torch.float32)
    nq, nk = num_blocks(L, bq), num_blocks(L, bk)
    fk, _ = pad_to_blocks(phi(k.to(ct)), bk)  # padded keys have zero features: they add nothing
    vp, _ = pad_to_blocks(v.to(ct), bk)
    fk = fk.reshape(B, H, nk, bk, D)
    h_blk = fk.transpose(-1, -2) @ vp.reshape(B, H, nk, bk, Dv)  # [B, H, nk, D, Dv]
    z_blk = fk.sum(3)  # [B, H, nk, D]
    rest = (~block_map).to(ct)  # [B, H, nq, nk]
    h_q = (rest @ h_blk.reshape(B, H, nk, D * Dv)).reshape(B, H, nq, D, Dv)
    z_q = rest @ z_blk  # [B, H, nq, D]
    fq, _ = pad_to_blocks(phi(q.to(ct)), bq)
    fq = fq.reshape(B, H, nq, bq, D)
    num = fq @ h_q  # [B, H, nq, bq, Dv]
    den = fq @ z_q.unsqueeze(-1)  # [B, H, nq, bq, 1]
    # den == 0 only where every block is selected or all features vanish; the numerator is then 0 as well
    # (features are non-negative), and 0 is returned where the reference gives 0/0
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return out.reshape(B, H, nq * bq, Dv)[:, :, :L]


def _check_args(q, k, v, proj_weight, proj_bias, block_q, block_k, topk, variant, feature_map):
    for name, t in (("q", q), ("k", k), ("v", v), ("proj_weight", proj_weight), ("proj_bias", proj_bias)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"sla_attention: {name} must be a floating-point tensor; got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"sla_attention: q and k must be [B, H, L, D] of one shape; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"sla_attention: v must be [B, H, L, Dv] = {list(q.shape[:3])} + [Dv]; got "
                         f"{tuple(v.shape)}")
    dv = v.shape[-1]
    if proj_weight.shape != (dv, dv) or proj_bias.shape != (dv,):
        raise ValueError(f"sla_attention: proj_weight must be [{dv}, {dv}] and proj_bias [{dv}] (v's head dim); "
                         f"got {tuple(proj_weight.shape)} and {tuple(proj_bias.shape)}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"sla_attention: {name} must be a positive int; got {b!r}")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0 < topk <= 1:
        raise ValueError(f"sla_attention: topk must be a number in (0, 1] (the fraction of key blocks kept); "
                         f"got {topk!r}")
    if variant not in VARIANTS:
        raise ValueError(f"sla_attention: variant must be one of {VARIANTS}; got {variant!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"sla_attention: feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}")


def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
                  proj_bias: torch.Tensor, *, block_q: int = 64, block_k: int = 64, topk: float = 0.5,
                  variant: str = "main", feature_map: str = "softmax", scale: float | None = None,
                  extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Sparse-linear attention ``Os + (Ol @ proj_weight^T + proj_bias)`` over ``[B, H, L, D]`` tensors.

    Differentiable in q, k, v, proj_weight and proj_bias; any ``L`` (ragged last blocks); fp32/fp16/bf16 (the
    sparse kernel runs in the input dtype, the linear branch and the projection in fp32), and float64 for
    gradient checks. ``scale`` defaults to ``D**-0.5`` (the reference's). ``extra_k``/``extra_v``
    (``[B, H, Se, D]``, joint attention's text keys) join the sparse softmax of every query and stay out of the
    block map and the linear branch. Returns ``[B, H, L, Dv]`` in q's dtype.
    """
    _check_args(q, k, v, proj_weight, proj_bias, block_q, block_k, topk, variant, feature_map)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    block_map = sla_block_map(q, k, block_q=block_q, block_k=block_k, topk=topk)
    o_s = _sparse_branch(q, k, v, block_map, block_q, block_k, scale, extra_k, extra_v, backend)
    if variant == "main":
        o_l = linear_attention(q, k, v, feature_map=feature_map, eps=MAIN_EPS)
    else:
        o_l = _complement_linear(q, k, v, block_map, block_q, block_k, resolve_feature_map(feature_map))
    ct = torch.promote_types(torch.promote_types(o_l.dtype, proj_weight.dtype), torch.float32)
    o_p = F.linear(o_l.to(ct), proj_weight.to(ct), proj_bias.to(ct))
    return (o_s.to(ct) + o_p).to(q.dtype)


# ---- the method's building blocks (the registered method wraps these) ----------------------------------------
REFERENCE_BLOCK = 64  # the reference's block size (BLKQ = BLKK = 64 in training)


def auto_block_size(length: int, topk: float) -> int:
    """The block size used when ``block_q``/``block_k`` are left automatic: the reference's 64 when a 64-token
    block map of ``length`` tokens keeps at least one key block at ``topk`` (at topk 0.1: more than 576 tokens),
    else the size that cuts the sequence into the fewest even blocks of which ``topk`` keeps one (the shapes
    world's 144-token videos: 10 blocks of 15 tokens, 1 kept). Refuses a sequence shorter than ``1 / topk``."""
    if int(topk * num_blocks(length, REFERENCE_BLOCK)) >= 1:
        return REFERENCE_BLOCK
    need = max(1, math.ceil(1 / topk) - 1)  # the fewest key blocks of which topk keeps one
    while int(topk * need) < 1:
        need += 1
    if need > length:
        raise ValueError(f"topk={topk} selects no key block of a {length}-token sequence even with 1-token "
                         f"blocks; use topk >= {1 / max(length, 1):.4g}")
    size = math.ceil(length / need)
    while num_blocks(length, size) < need:
        size -= 1
    return size


@dataclass
class SLAConfig(Schedule):
    """SLA options. ``None`` means the model family's default (see ``SLA_DEFAULTS``) or, for block sizes,
    automatic (:func:`auto_block_size`)."""

    topk: float | None = option(
        None, low=0, high=1,
        help="fraction of key blocks each query block attends exactly (1 - sparsity, > 0); default: the family's "
             "(0.1, as TurboDiffusion trains)")
    block_q: int | None = option(None, low=1, high=1024,
                                 help="query block size of the block map and kernel; default 64, smaller for "
                                      "sequences too short to keep a 64-token block at this topk")
    block_k: int | None = option(None, low=1, high=1024,
                                 help="key block size of the block map and kernel; default as block_q")
    variant: str = option("main", choices=VARIANTS,
                          help="'main': linear branch over all keys (upstream); 'sla1': over the non-selected "
                               "key blocks only (branch SLA-1). Weights trained with one do not fit the other")
    feature_map: str = option("softmax", choices=FEATURE_MAPS, help="linear-attention feature map of q and k")
    backend: str = option("auto", choices=BACKENDS, help="block-sparse kernel backend")
    weights: str | None = option(None, help="safetensors file of trained projections (attnproc finetune, "
                                            "train: method); default: zero projections (plain block-sparse)")

    def validate(self):
        if self.topk is not None and not self.topk > 0:
            raise ValueError(f"topk must be > 0 (the fraction of key blocks kept, in (0, 1]); got {self.topk}")

    def resolved(self, family: str | None, step_known: bool = True) -> "SLAConfig":
        from attnproc.errors import UnsupportedFamilyError
        from attnproc.sparse.base import fill_defaults

        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedFamilyError(f"method 'sla' does not support the model family {family!r}; supported "
                                         f"families: {', '.join(SUPPORTED_FAMILIES)}")
        return fill_defaults(self, SLA_DEFAULTS[family], step_known)


def sla_visual_attention(q, k, v, extra_k, extra_v, scale, *, config: SLAConfig, layout, proj) -> torch.Tensor:
    """One SLA call over the visual tokens of ``layout`` (frame-major order, the order the reference's blocks
    run in), with joint attention's text keys as ``extra_k``/``extra_v``. ``config`` must be resolved (no
    ``None`` topk); automatic block sizes are chosen for this call's length. ``proj`` is the module's
    ``nn.Linear(D, D)``. This is what the registered method's ``visual_attention`` runs."""
    if config.topk is None:
        raise ValueError("sla_visual_attention needs a resolved config (topk is None); use config.resolved(family)")
    if layout is not None and q.shape[2] != layout.visual_len:
        raise RuntimeError(f"SLA: {q.shape[2]} visual queries do not match the layout grid {layout.grid} "
                           f"({layout.visual_len} tokens)")
    auto = None if config.block_q is not None and config.block_k is not None else \
        auto_block_size(q.shape[2], config.topk)
    return sla_attention(q, k, v, proj.weight, proj.bias, block_q=config.block_q or auto,
                         block_k=config.block_k or auto, topk=config.topk, variant=config.variant,
                         feature_map=config.feature_map, scale=scale, extra_k=extra_k, extra_v=extra_v,
                         backend=config.backend)

# ---- the per-module projection file -------------------------------------------------------------------------
FILE_FORMAT = "attnproc-sla"


class SLAWeightsError(ValueError):
    """An SLA projection file that does not fit the model, variant or modules it is loaded for."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """``ClassName:<hash of the architecture config>``: what a projection file was trained for. diffusers models
    hash their ``config`` (private ``_`` keys such as the load path left out); other modules hash their
    parameter names and shapes."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Mapping):
        desc = {k: cfg[k] for k in sorted(cfg) if not str(k).startswith("_")}
    else:
        desc = {n: list(p.shape) for n, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{type(model).__name__}:{digest}"


TRAINED_WITH = ("feature_map", "topk", "block_q", "block_k")  # options a projection is tuned to


def save_sla_weights(path: str | os.PathLike, projections: Mapping[str, torch.nn.Linear | tuple], *,
                     variant: str, model: str, trained_with: Mapping[str, Any] | None = None) -> Path:
    """Write one safetensors file: ``<module>.weight`` ``[D, D]`` and ``<module>.bias`` ``[D]`` per attention
    module, metadata ``format``, ``variant``, ``model`` (a :func:`model_fingerprint`) and, when given, the
    ``trained_with`` options of :data:`TRAINED_WITH` (JSON; ``None`` block sizes = automatic). Written to a
    temporary name and renamed, so a kill never leaves a half-written file."""
    from safetensors.torch import save_file

    if variant not in VARIANTS:
        raise ValueError(f"save_sla_weights: variant must be one of {VARIANTS}; got {variant!r}")
    tensors = {}
    for name, proj in projections.items():
        w, b = (proj.weight, proj.bias) if isinstance(proj, torch.nn.Module) else proj
        tensors[f"{name}.weight"] = w.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.bias"] = b.detach().to("cpu", torch.float32).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    meta = {"format": FILE_FORMAT, "variant": variant, "model": str(model)}
    if trained_with is not None:
        meta["trained_with"] = json.dumps({k: trained_with.get(k) for k in TRAINED_WITH}, sort_keys=True)
    save_file(tensors, str(partial), metadata=meta)
    os.replace(partial, path)
    return path


def load_sla_weights(path: str | os.PathLike, dims: Mapping[str, int], *, variant: str,
                     model: str | None = None, options: Mapping[str, Any] | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a projection file for the modules ``dims`` (module name -> head dim) and return
    ``{module: (weight [D, D], bias [D])}`` in fp32. Everything is checked before anything is returned: the file
    format, the variant, the model fingerprint (when ``model`` is given), the feature map (when the file and
    ``options`` both name one: a projection of other features is meaningless), missing, extra and mis-shaped keys;
    one :class:`SLAWeightsError` lists every problem by name. A ``topk`` or block size other than the file's
    only warns: the projection still applies, but it was tuned to the other block map."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SLA weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # not a safetensors file
        raise SLAWeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FILE_FORMAT:
        raise SLAWeightsError(f"{path}: not an SLA projection file (metadata format={meta.get('format')!r}, "
                              f"expected {FILE_FORMAT!r})")
    problems = []
    if meta.get("variant") != variant:
        problems.append(f"trained for variant {meta.get('variant')!r}, loading for variant {variant!r}")
    if model is not None and meta.get("model") != model:
        problems.append(f"trained for model {meta.get('model')!r}, loading into model {model!r}")
    trained, moved = _trained_with(meta, problems), []
    if options is not None and trained:
        if trained.get("feature_map") != options.get("feature_map"):
            problems.append(f"trained with feature_map {trained.get('feature_map')!r}, loading with feature_map "
                            f"{options.get('feature_map')!r}")
        moved = [f"{k}={options.get(k)!r} (trained with {trained.get(k)!r})" for k in TRAINED_WITH[1:]
                 if trained.get(k) != options.get(k)]
    expected = {f"{m}.{part}" for m in dims for part in ("weight", "bias")}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if extra:
        problems.append("unexpected keys: " + ", ".join(extra))
    for m, d in dims.items():
        for part, shape in (("weight", (d, d)), ("bias", (d,))):
            t = tensors.get(f"{m}.{part}")
            if t is not None and tuple(t.shape) != shape:
                problems.append(f"{m}.{part} has shape {tuple(t.shape)}, expected {shape}")
    if problems:
        raise SLAWeightsError(f"{path} does not fit: " + "; ".join(problems))
    if moved:
        warnings.warn(f"{path}: applying SLA projections with " + ", ".join(moved) + "; they were tuned to the "
                      "training block map, so pass the training options for the fidelity they were trained for",
                      stacklevel=_caller_level())
    return {m: (tensors[f"{m}.weight"].float(), tensors[f"{m}.bias"].float()) for m in dims}


def _trained_with(meta: Mapping[str, str], problems: list[str]) -> dict:
    """The file's ``trained_with`` record ({} when absent: files written before it existed load unchecked)."""
    raw = meta.get("trained_with")
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        problems.append(f"metadata trained_with is not a JSON object of options: {raw[:80]!r}")
        return {}
    return record


def _caller_level() -> int:
    """``stacklevel`` for a warning raised in the caller of this function that points at the first frame outside
    attnproc (the user's ``apply`` line), however many of our frames lie between."""
    level, frame = 2, sys._getframe(2)  # level 1: the function that warns; 2: its caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith("attnproc"):
        frame, level = frame.f_back, level + 1
    return level


# ---- the registered method ----------------------------------------------------------------------------------
def _head_dim(module: torch.nn.Module) -> int:
    """The per-head value width of a diffusers attention module (the size of its ``proj_l``)."""
    return module.inner_dim // module.heads


@register
class SLA(SparseMethod):
    """SLA on every self-attention (and joint) module, each with its own ``proj_l`` (``create_state``), zero
    unless ``weights`` names a trained file. Cross-attention runs dense, as in TurboDiffusion."""

    name = "sla"
    summary = ("Sparse-Linear Attention: exact softmax over each query block's top-k key blocks plus a learned "
               "projection of a linear attention; needs fine-tuning (attnproc finetune, train: method)")
    Config = SLAConfig
    families = SUPPORTED_FAMILIES
    defaults = SLA_DEFAULTS
    sparse_kinds = ("self", "joint")
    # per head over the whole sequence (block map, linear branch); proj_l acts on the head dim, shared by heads
    context_parallel = frozenset({"ulysses"})

    def __init__(self, config=None):
        super().__init__(config)
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def weight_dims(target) -> dict[str, int]:
        """``{"<denoiser>.<module name>": head dim}`` of every module that gets a ``proj_l``: the keys of a
        projection file for ``target`` (a pipeline: ``transformer.blocks.0.attn1``; a bare model: its class
        name in front)."""
        from attnproc.api import _denoisers
        from attnproc.families import attention_modules, family_of

        dims = {}
        for den, model in _denoisers(target):
            family = family_of(model)
            for name, module in attention_modules(model):
                if family.kind_of(name, module) in SLA.sparse_kinds:
                    dims[f"{den}.{name}"] = _head_dim(module)
        return dims

    @staticmethod
    def model_id(target) -> str:
        """What a projection file records as its model: the fingerprint of each denoiser, by name."""
        from attnproc.api import _denoisers

        return ";".join(f"{den}={model_fingerprint(model)}" for den, model in _denoisers(target))

    def bind(self, target) -> None:
        """Also reads and checks ``weights`` against ``target`` (before apply changes anything)."""
        super().bind(target)
        self._loaded = {}
        if self.config.weights is not None:
            self._loaded = load_sla_weights(self.config.weights, self.weight_dims(target),
                                            variant=self.config.variant, model=self.model_id(target),
                                            options=self.trained_with(target))

    def create_state(self, site):
        if site.kind not in self.sparse_kinds:
            return None
        d = _head_dim(site.module)
        device = next(site.module.parameters()).device
        proj = torch.nn.Linear(d, d, dtype=torch.float32, device=device)  # fp32, as the reference keeps it
        weight, bias = self._loaded.get(f"{site.denoiser}.{site.name}", (torch.zeros(d, d), torch.zeros(d)))
        with torch.no_grad():
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        return proj

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        return sla_visual_attention(q, k, v, extra_k, extra_v, scale, config=config, layout=layout,
                                    proj=self.module_state(site))

    def save_weights(self, path, target, states: Mapping[str, torch.nn.ModuleDict]) -> Path:
        """Write the projections ``states`` (``Handle.states()`` of this method applied to ``target``) as the
        file ``apply(target, "sla", weights=path)`` loads."""
        return save_sla_weights(path, {name: s[self.name] for name, s in states.items() if self.name in s},
                                variant=self.config.variant, model=self.model_id(target),
                                trained_with=self.trained_with(target))

    def trained_with(self, target) -> dict:
        """The options a projection is tuned to (:data:`TRAINED_WITH`), family defaults filled in for
        ``target``'s first denoiser (block sizes stay ``None`` when automatic)."""
        from attnproc.families import denoiser_families

        found = denoiser_families(target)
        family, variant = found[0] if found else (None, None)
        config = self.resolve(self.config, family, variant)
        return {k: getattr(config, k) for k in TRAINED_WITH}
