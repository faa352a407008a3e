"""VMoBA (KwaiVGI/VMoBA): mixture-of-block attention for video with a layer-wise 1D/2D/3D partition.

Per layer the visual tokens are cut into chunks: frames (1D), spatial tiles over all frames (2D) or
space-time cubes (3D), cycling with the layer index. Each query scores every chunk by the unscaled dot product
of the query with the chunk's mean key (the "gate"), always attends its own chunk, and adds the chunks picked
by ``topk`` or by the cumulative ``threshold`` rule (see :func:`select_chunks`). Selection is per query token and
per head; attention runs over the union of the picked chunks in one softmax (:func:`chunk_attention`), and is
differentiable, so VMoBA can be fine-tuned.

    vmoba_token_mask(q, k, (T, H, W), (ct, ch, cw), select="threshold", tau=0.25)   # for parity checks
    vmoba_visual_attention(q, k, v, None, None, scale, config=VMoBAConfig(), layout=layout, layer_index=5)

Differences from the reference (``docs/vmoba.md``): grids a chunk does not divide get ragged edge chunks (the
reference asserts divisibility); selection groups never span batch elements; sort ties go to the lower index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from attnproc.errors import ContextParallelError
from attnproc.kernels import BACKENDS
from attnproc.options import check_config, option
from attnproc.registry import register
from attnproc.schedule import Schedule

from ._tiles import divisors
from .base import SparseMethod
from .gilbert import check_grid as _grid
from .select import Partition, box_partition, chunk_attention, chunk_means, keep_prefix, permutation_partition

__all__ = ["vmoba_token_mask", "vmoba_partition", "vmoba_gate", "select_chunks", "selected_share",
           "vmoba_visual_attention", "default_chunk", "VMoBAConfig", "VMOBA_DEFAULTS", "VMOBA_SETTINGS",
           "SELECT_MODES", "THRESHOLD_TYPES", "SUPPORTED_FAMILIES", "VMoBA"]

SELECT_MODES = ("topk", "threshold")
THRESHOLD_TYPES = ("query_head", "head_global", "block", "overall")
SUPPORTED_FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "ltx")
EPS = 1e-6  # the reference's epsilon (min-max denominator floor and ratio denominators)
SELF_BOOST = 1e9  # the reference adds this to the own chunk's gate in top-k mode

# The paper's two settings (App. A): training-free uses MoBA's local + top-k selection with k about a quarter of
# the chunks (Table 4: k = 2/6/18 of 7/24/72 chunks, 2/10/9 of 7/40/36); training uses the global (per-head)
# threshold selection with tau = 0.25 (Sec. 4.1).
VMOBA_SETTINGS: dict[str, dict] = {
    "training_free": dict(select="topk", threshold_type="query_head", topk_ratio=0.25, tau=0.25),
    "training": dict(select="threshold", threshold_type="head_global", topk_ratio=0.25, tau=0.25),
}
# Per-family schedule: the paper keeps the first 25% of denoising steps dense; FastVideo's port has no dense
# layers by default. VMoBA was published for Wan 2.1 only; the other video families take the same values.
VMOBA_DEFAULTS: dict[str, dict] = {f: dict(dense_first_steps=0.25, dense_first_layers=0) for f in SUPPORTED_FAMILIES}
# chunk counts the derived chunk sizes aim at (paper default 8-48-72; Table 4 uses 7-24-72 at 480p)
TARGET_FRAMES_1D = 3
TARGET_CHUNKS_2D = 24
TARGET_CHUNKS_3D_T = 3
MIN_CHUNK_TOKENS = 256


# ---- partition ---------------------------------------------------------------------------------------------


def _check_chunk(grid, chunk):
    T, H, W = grid
    if isinstance(chunk, bool):
        raise ValueError(f"chunk must be an int (frames), (ch, cw) or (ct, ch, cw); got {chunk!r}")
    if isinstance(chunk, (int, float)):
        if not (math.isfinite(chunk) and chunk > 0):
            raise ValueError(f"chunk (frames per 1D chunk) must be > 0; got {chunk!r}")
        if chunk > T:
            raise ValueError(f"chunk {chunk!r} frames is larger than the grid's {T} frames (grid {grid})")
        if int(chunk * H * W) < 1:
            raise ValueError(f"chunk {chunk!r} frames is less than one token of the grid {grid}")
        return chunk
    try:
        chunk = tuple(chunk)
    except TypeError:
        raise ValueError(f"chunk must be an int (frames), (ch, cw) or (ct, ch, cw); got {chunk!r}") from None
    if len(chunk) not in (2, 3) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chunk):
        raise ValueError(f"chunk must be an int (frames), (ch, cw) or (ct, ch, cw) of positive ints; got {chunk!r}")
    sides = grid[1:] if len(chunk) == 2 else grid
    if any(c > g for c, g in zip(chunk, sides)):
        raise ValueError(f"chunk {chunk} is larger than the grid {grid} along some dimension")
    return chunk


def vmoba_partition(grid, chunk) -> Partition:
    """The reference's token order and chunks for ``chunk``: an int/float (1D, frames per chunk: consecutive
    tokens, the last chunk shorter), ``(ch, cw)`` (2D: all frames of one spatial tile) or ``(ct, ch, cw)`` (3D
    cubes). Sides that do not divide the grid end in ragged (smaller) chunks."""
    grid = _grid(grid)
    chunk = _check_chunk(grid, chunk)
    T, H, W = grid
    if isinstance(chunk, (int, float)):
        return permutation_partition(None, T * H * W, int(chunk * H * W))
    box = (T,) + chunk if len(chunk) == 2 else chunk
    return box_partition(grid, box)


def _side(length: int, target_count: float) -> int:
    """A chunk side for ``length`` giving about ``target_count`` chunks: a divisor of ``length`` when one is
    within a factor 1.5 of the target count (no ragged chunk), else ``ceil(length / target)``."""
    target_count = min(max(target_count, 1.0), length)
    best = min(divisors(length), key=lambda d: abs(math.log((length / d) / target_count)))
    if abs(math.log((length / best) / target_count)) <= math.log(1.5):
        return best
    return max(1, math.ceil(length / round(target_count)))


def _tiles(H: int, W: int, count: float) -> tuple[int, int]:
    """``(ch, cw)`` giving about ``count`` spatial tiles with the grid's aspect ratio."""
    if count <= 1:
        return H, W
    nh = math.sqrt(count * H / W)
    return _side(H, nh), _side(W, count / max(1.0, min(nh, H)))


def default_chunk(grid, kind: int):
    """The chunk derived from the grid for partition ``kind`` (0: 1D, 1: 2D, 2: 3D): 3 frames; about 24 spatial
    tiles with the grid's aspect ratio; 3 time slabs of about 24 tiles (the paper's 7-24-72 at 480p). Short
    videos get fewer, larger chunks so that no chunk falls below ``MIN_CHUNK_TOKENS`` (the paper's chunks hold
    about 450-1900 tokens; tiny chunks make the gather cost more than the attention it saves)."""
    T, H, W = _grid(grid)
    N = T * H * W
    if kind == 0:
        return min(TARGET_FRAMES_1D, T)
    if kind == 1:
        return _tiles(H, W, min(TARGET_CHUNKS_2D, max(1, N // MIN_CHUNK_TOKENS)))
    total = min(TARGET_CHUNKS_2D * TARGET_CHUNKS_3D_T, max(1, N // MIN_CHUNK_TOKENS))
    ct = _side(T, min(TARGET_CHUNKS_3D_T, total))
    return (ct,) + _tiles(H, W, total / math.ceil(T / ct))


# ---- gate and selection ------------------------------------------------------------------------------------
def vmoba_gate(q: torch.Tensor, k: torch.Tensor, part: Partition) -> torch.Tensor:
    """Gate logits ``[B, H, C, N]`` in float32: each query (layout order) dotted with each chunk's mean key,
    no ``1/sqrt(d)`` scaling (as the reference)."""
    kbar = chunk_means(k, part)  # [B, H, C, D]
    return torch.matmul(kbar, q.float().transpose(-1, -2))


def _threshold_rows(g: torch.Tensor, own: torch.Tensor, tau: float, sort_own: bool) -> torch.Tensor:
    """The reference's cumulative threshold rule on rows ``[..., M]`` (one normalisation group per row)."""
    M = g.shape[-1]
    gmin = g.amin(-1, keepdim=True)
    denom = g.amax(-1, keepdim=True) - gmin
    denom = torch.where(denom <= EPS, torch.ones_like(denom), denom)
    gn = (g - gmin) / denom
    total = gn.sum(-1, keepdim=True)
    remain = (tau - (gn * own).sum(-1, keepdim=True) / (total + EPS)).clamp(min=0.0)
    others = gn.masked_fill(own, 0.0)
    n_cand = M if sort_own else (~own).sum(-1, keepdim=True)
    key = others if sort_own else others.masked_fill(own, float("-inf"))  # "overall" sorts the others only

    def count_of(vals, complete):
        ratio = vals.clamp(min=0.0).cumsum(-1) / (total + EPS)
        cond = (ratio >= remain) & (torch.arange(vals.shape[-1], device=g.device) < n_cand)
        found = cond.any(-1, keepdim=True)
        first = cond.float().argmax(-1, keepdim=True) + 1
        return torch.where(found, first, n_cand if complete else 0)

    probes = (max(256, M // 8), M // 3) if M > 4096 else ()  # partial sorts first: the prefix is usually short
    return keep_prefix(key, count_of, probes) | own


def _topk_rows(g: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    count = torch.full((*g.shape[:-1], 1), k, device=g.device)
    probes = (k + 1,)
    return keep_prefix(g + own * SELF_BOOST, lambda vals, complete: count, probes)


def select_chunks(gate: torch.Tensor, part: Partition, *, select: str = "threshold",
                  threshold_type: str = "query_head", tau: float = 0.25, topk: int = 3) -> torch.Tensor:
    """bool ``[B, H, C, N]``: query ``n`` of head ``h`` attends chunk ``c`` (own chunk included).

    ``select="topk"``: the own chunk's gate is raised by 1e9, then the top ``min(topk, C)`` chunks per query
    (``query_head``), the top ``k*N`` (chunk, query) pairs per head (``head_global``) or the top ``k*H*N``
    triples (``overall``). ``select="threshold"``: gates min-max normalised within the group (per query and head,
    per head, per chunk over heads and queries, or overall); still needed ``r = max(tau - own share, 0)``; the
    other entries in descending order up to the first prefix whose sum over the group total reaches ``r``
    (all of them if none does). Groups never span batch elements."""
    _check_select(select, threshold_type, tau, topk)
    B, H, C, N = gate.shape
    own = (part.chunk_of.to(gate.device)[None, :] == torch.arange(C, device=gate.device)[:, None])  # [C, N]
    own = own.expand(B, H, C, N)
    if select == "topk":
        k = min(int(topk), C)
        if threshold_type == "query_head":
            return _topk_rows(gate.transpose(2, 3), own.transpose(2, 3), k).transpose(2, 3)
        if threshold_type == "head_global":
            return _topk_rows(gate.reshape(B, H, C * N), own.reshape(B, H, C * N), k * N).reshape(B, H, C, N)
        # overall: flattened in the reference's (chunk, head, query) order
        g, o = gate.transpose(1, 2).reshape(B, -1), own.transpose(1, 2).reshape(B, -1)
        return _topk_rows(g, o, k * H * N).reshape(B, C, H, N).transpose(1, 2)
    if threshold_type == "query_head":
        return _threshold_rows(gate.transpose(2, 3), own.transpose(2, 3), tau, True).transpose(2, 3)
    if threshold_type == "head_global":
        return _threshold_rows(gate.reshape(B, H, -1), own.reshape(B, H, -1), tau, True).reshape(B, H, C, N)
    g, o = gate.transpose(1, 2), own.transpose(1, 2)  # [B, C, H, N]
    if threshold_type == "block":
        return _threshold_rows(g.reshape(B, C, -1), o.reshape(B, C, -1), tau, True).reshape(B, C, H, N).transpose(1, 2)
    return _threshold_rows(g.reshape(B, -1), o.reshape(B, -1), tau, False).reshape(B, C, H, N).transpose(1, 2)


def _check_select(select, threshold_type, tau, topk):
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}; got {select!r}")
    if threshold_type not in THRESHOLD_TYPES:
        raise ValueError(f"threshold_type must be one of {THRESHOLD_TYPES}; got {threshold_type!r}")
    if select == "topk":
        if threshold_type == "block":
            raise ValueError("threshold_type='block' is only defined for select='threshold' (as in the reference); "
                             "use 'query_head', 'head_global' or 'overall' with select='topk'")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an int >= 1 (chunks per query, own chunk included); got {topk!r}")
    elif isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1] (share of the normalised gate mass); got {tau!r}")


def vmoba_token_mask(q: torch.Tensor, k: torch.Tensor, grid, chunk, *, select: str = "threshold",
                     threshold_type: str = "query_head", tau: float = 0.25, topk: int = 3) -> torch.Tensor:
    """VMoBA's attention pattern as a bool ``[B, H, S, S]`` token mask in the original frame-major raster order
    (True = the query attends the key; the own chunk included). ``q, k``: ``[B, H, S, D]`` with
    ``S = T*H*W``; ``grid = (T, H, W)``; ``chunk`` as the reference's chunk size (see :func:`vmoba_partition`).
    Builds an ``S x S`` tensor: for tests and pictures, not for attention."""
    _check_select(select, threshold_type, tau, topk)
    grid = _grid(grid)
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, S, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] != math.prod(grid):
        raise ValueError(f"q has {q.shape[2]} tokens but the grid {grid} has {math.prod(grid)}")
    part = vmoba_partition(grid, chunk)
    sel = select_chunks(vmoba_gate(part.permute(q), part.permute(k), part), part, select=select,
                        threshold_type=threshold_type, tau=tau, topk=topk)  # [B, H, C, N] (layout positions)
    pos = part.inverse if part.inverse is not None else torch.arange(q.shape[2])
    pos = pos.to(q.device)
    chunk_of_key = part.chunk_of.to(q.device)[pos]  # chunk of each raster key
    m = sel.index_select(2, chunk_of_key).index_select(3, pos)  # [B, H, key j, query i]
    return m.transpose(2, 3).contiguous()


# ---- config and the visual attention -----------------------------------------------------------------------
def _chunk_option(value, name, length):
    if value is None:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if not (isinstance(value, tuple) and len(value) == length and
            all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in value)):
        raise ValueError(f"{name} must be None (derived from the grid) or {length} positive ints; got {value!r}")
    return value


@dataclass
class VMoBAConfig(Schedule):
    """VMoBA options. ``None`` means derived: selection options from ``setting``, chunk sizes from the grid,
    the schedule from the model family (``VMOBA_DEFAULTS``)."""

    dense_first_steps: float | None = option(
        None, low=0, high=10000, help="run dense for the first N steps (< 1: a fraction); default: 0.25 (paper)")
    dense_first_layers: int | None = option(
        None, low=0, high=10000, help="run dense in the first N blocks; the 1D/2D/3D cycle starts after them")
    setting: str = option("training_free", choices=tuple(VMOBA_SETTINGS),
                          help="'training_free': local + top-k (paper App. A); 'training': global + threshold 0.25")
    select: str | None = option(None, choices=SELECT_MODES, help="chunk selection: 'topk' or 'threshold'")
    threshold_type: str | None = option(None, choices=THRESHOLD_TYPES,
                                        help="selection group: query_head, head_global, block (threshold only), "
                                             "overall")
    tau: float | None = option(None, low=1e-6, high=1.0, help="threshold: share of the gate mass to cover, (0, 1]")
    topk: int | None = option(None, low=1, high=100000,
                              help="top-k: chunks per query (own included); default: topk_ratio x chunks")
    topk_ratio: float | None = option(None, low=0.0, high=1.0,
                                      help="top-k default: this fraction of the layer's chunks (paper: 0.25)")
    chunk_1d: int | None = option(None, low=1, high=100000, help="frames per 1D chunk; default 3")
    chunk_2d: Sequence[int] | None = option(None, help="(ch, cw) of 2D chunks; default: about 24 tiles")
    chunk_3d: Sequence[int] | None = option(None, help="(ct, ch, cw) of 3D chunks; default: 3 x about 24 cubes")
    block_q: int = option(512, low=16, high=4096,
                          help="largest query block when packing the queries that picked a chunk")
    backend: str = option("auto", choices=BACKENDS, help="block-sparse kernel backend")

    def validate(self):
        if self.tau is not None and not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1]; got {self.tau}")
        if self.topk is not None and (isinstance(self.topk, bool) or int(self.topk) != self.topk or self.topk < 1):
            raise ValueError(f"topk must be an int >= 1; got {self.topk}")
        self.chunk_2d = _chunk_option(self.chunk_2d, "chunk_2d", 2)
        self.chunk_3d = _chunk_option(self.chunk_3d, "chunk_3d", 3)
        if self.select == "topk" and self.threshold_type == "block":
            raise ValueError("threshold_type='block' needs select='threshold'")

    def __post_init__(self):  # a bad value is refused when the config is built, as an OptionError
        check_config(self, "vmoba")

    def resolved(self, family: str | None = None) -> "VMoBAConfig":
        """A copy with every derived option filled in (chunk sizes stay ``None``: they depend on the grid)."""
        values = dict(VMOBA_SETTINGS[self.setting])
        values.update(VMOBA_DEFAULTS.get(family, dict(dense_first_steps=0.25, dense_first_layers=0)))
        changes = {k: v for k, v in values.items() if getattr(self, k) is None}
        out = replace(self, **changes)
        if out.select == "topk" and out.threshold_type == "block":
            raise ValueError("threshold_type='block' needs select='threshold'")
        return out

    def partition_kind(self, layer_index: int) -> int:
        """0 (1D), 1 (2D) or 2 (3D): the paper's ``layer mod 3``, counted after the dense first layers."""
        return (int(layer_index) - int(self.dense_first_layers or 0)) % 3

    def chunk_for(self, grid, layer_index: int):
        kind = self.partition_kind(layer_index)
        explicit = (self.chunk_1d, self.chunk_2d, self.chunk_3d)[kind]
        if explicit is None:
            return default_chunk(grid, kind)
        sizes = (explicit,) if kind == 0 else tuple(explicit)
        if any(c > g for c, g in zip(sizes, tuple(grid)[-len(sizes):] if kind == 1 else grid)):
            name = ("chunk_1d", "chunk_2d", "chunk_3d")[kind]
            raise ValueError(f"vmoba option {name}={explicit!r} is larger than this call's token grid {tuple(grid)} "
                             f"(frames, height, width); use a smaller {name}, or None to derive it from the grid")
        return explicit

    def topk_for(self, num_chunks: int) -> int:
        if self.topk is not None:
            return int(self.topk)
        ratio = self.topk_ratio if self.topk_ratio is not None else 0.25
        return max(1, int(round(ratio * num_chunks)))


def selected_share(part, sel: torch.Tensor) -> float:
    """The share of (query, key) pairs a chunk selection ``sel`` ``[B, H, C, N]`` attends (its density)."""
    lengths = torch.tensor(part.lengths, dtype=torch.float64, device=sel.device)
    return float((sel.double() * lengths[None, None, :, None]).sum() / (sel.shape[0] * sel.shape[1] * part.size ** 2))


def vmoba_visual_attention(q, k, v, extra_k, extra_v, scale, *, config: VMoBAConfig, layout, layer_index: int,
                           return_density: bool = False):
    """VMoBA over the visual tokens ``[B, H, N, D]`` (frame-major raster order) of ``layout``'s grid, with
    optional extra (text) keys that every visual query attends in the same softmax. ``layer_index`` picks the
    1D/2D/3D partition. Returns ``[B, H, N, Dv]``; with ``return_density`` also :func:`selected_share` of the
    call's selection (what benchmarks report)."""
    cfg = config.resolved() if config.select is None or config.threshold_type is None else config
    grid = (layout.frames, layout.height, layout.width)
    if q.shape[2] != math.prod(grid):
        raise ValueError(f"VMoBA: {q.shape[2]} visual tokens do not match the grid {grid}")
    part = vmoba_partition(grid, cfg.chunk_for(grid, layer_index))
    qp, kp, vp = part.permute(q), part.permute(k), part.permute(v)
    sel = select_chunks(vmoba_gate(qp, kp, part), part, select=cfg.select, threshold_type=cfg.threshold_type,
                        tau=cfg.tau if cfg.tau is not None else 0.25, topk=cfg.topk_for(part.num_chunks))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = chunk_attention(qp, kp, vp, part, sel, scale, extra_k=extra_k, extra_v=extra_v, block_max=cfg.block_q,
                          backend=cfg.backend)
    return (part.unpermute(out), selected_share(part, sel)) if return_density else part.unpermute(out)


# ---- the method --------------------------------------------------------------------------------------------
@register
class VMoBA(SparseMethod):
    """VMoBA as a method: the layer's block index (``site.layer``) picks the 1D/2D/3D partition; selection is
    recomputed from each call's queries and keys, so there is no static token mask."""

    name = "vmoba"
    summary = "VMoBA: query-dependent mixture-of-block attention, layer-wise 1D/2D/3D chunks (video DiTs)."
    Config = VMoBAConfig
    families = SUPPORTED_FAMILIES
    defaults = VMOBA_DEFAULTS
    sparse_kinds = ("self", "joint")
    context_parallel = frozenset({"ulysses"})  # exact when the selection group stays within one head

    def check_parallel(self, mode: str) -> None:
        super().check_parallel(mode)
        group = self.config.resolved().threshold_type
        if group in ("block", "overall"):
            raise ContextParallelError(
                f"method 'vmoba' with threshold_type={group!r} selects over all heads together, which a Ulysses rank "
                "(a subset of the heads) cannot do exactly; use threshold_type 'query_head' or 'head_global' under "
                "context parallelism")

    @classmethod
    def resolve(cls, config, family, variant=None, step_known=True):
        # the family fills the schedule, then ``setting`` fills the selection options
        return super().resolve(config, family, variant, step_known).resolved(family)

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        return vmoba_visual_attention(q, k, v, extra_k, extra_v, scale, config=config, layout=layout,
                                      layer_index=site.layer or 0)
