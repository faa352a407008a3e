"""Context parallelism (diffusers' ``ContextParallelConfig``): our own Ulysses and Ring exchanges around a method.

Under ``enable_parallelism`` every rank holds a shard of the token sequence. The processor runs the stock
processor *without* diffusers' parallel attention, so its one SDPA call reaches us with the rank's local
``q, k, v``; here we do the exchange ourselves, so that the method sees what it sees on one device:

* **Ulysses** (:func:`ulysses`): one all-to-all gives each rank the whole sequence for a contiguous range of the
  global heads (``torch.tensor_split`` of the heads, so ragged head counts work), in the canonical token order of
  the layout: a joint call's shards are ``[text_r, visual_r]`` per rank and are put back as ``[text, visual]``.
  The method then runs unchanged on that call with ``site.heads`` = its global head indices; the output goes
  back with the reverse all-to-all. Keys the CP plan did not split (Wan's text context) are only sliced by head.
* **Ring** (:mod:`attnproc.ring`): the rank keeps its queries and receives the key/value shards its static mask
  needs; the rest are refused, naming Ulysses.

The shard sizes are not communicated: diffusers splits every sequence it shards with ``chunk`` /
``tensor_split`` over all CP ranks, so rank ``r``'s share of ``n`` tokens is ``tensor_split``'s ``r``-th size.
The layout (from the unsharded forward inputs) gives ``n`` for the visual and the text part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._compat import cp_group, cp_settings
from .errors import ContextParallelError

__all__ = ["ParallelPlan", "mode_of", "plan_of", "split_sizes", "ulysses"]


@dataclass(frozen=True)
class ParallelPlan:
    """What the CP config means for one rank: ``mode`` (``"ulysses"`` or ``"ring"``), the process group of the
    exchange, this rank's index in it and the group size."""

    mode: str
    group: object
    rank: int
    world: int
    ragged: bool  # ulysses_anything / ring_anything: shard sizes may differ by one


def mode_of(config) -> str:
    """``"ulysses"`` or ``"ring"``: the context-parallel mode of diffusers' ``ParallelConfig``."""
    ring_degree, ulysses_degree, _ = cp_settings(config)
    if ring_degree > 1 and ulysses_degree > 1:
        raise ContextParallelError(
            f"attnproc: ring_degree={ring_degree} with ulysses_degree={ulysses_degree} (unified attention) is not "
            "supported; use ulysses_degree alone (ring_degree=1)")
    return "ring" if ring_degree > 1 else "ulysses"


def plan_of(config) -> ParallelPlan:
    """The :class:`ParallelPlan` of diffusers' ``ParallelConfig`` (set by ``enable_parallelism``)."""
    mode, ragged = mode_of(config), cp_settings(config)[2]
    group = cp_group(config, mode)
    return ParallelPlan(mode, group, dist.get_rank(group), dist.get_world_size(group), ragged)


def split_sizes(n: int, world: int) -> list[int]:
    """Each rank's share of ``n`` items as diffusers splits them (``torch.tensor_split`` order)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class _AllToAll(torch.autograd.Function):
    """``out[j]`` = what rank ``j`` sent us; ``chunks[j]`` goes to rank ``j``. Backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, group, recv_shapes, *chunks):
        ctx.group, ctx.send_shapes = group, [c.shape for c in chunks]
        return tuple(_exchange(list(chunks), recv_shapes, group))

    @staticmethod
    def backward(ctx, *grads):
        back = _exchange([g.contiguous() for g in grads], ctx.send_shapes, ctx.group)
        return (None, None, *back)


def _exchange(chunks: list[torch.Tensor], recv_shapes, group) -> list[torch.Tensor]:
    send = torch.cat([c.reshape(-1) for c in chunks])
    sizes_in = [c.numel() for c in chunks]
    sizes_out = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = send.new_empty(sum(sizes_out))
    dist.all_to_all_single(recv, send, sizes_out, sizes_in, group=group)
    return [part.reshape(s) for part, s in zip(recv.split(sizes_out), recv_shapes)]


def _all_to_all(chunks, recv_shapes, group) -> list[torch.Tensor]:
    return list(_AllToAll.apply(group, [tuple(s) for s in recv_shapes], *[c.contiguous() for c in chunks]))


# ---- token order -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Segments:
    """How a sharded sequence is laid out: per rank, the sizes of its consecutive parts (one part, or text and
    visual in the unsharded order)."""

    per_rank: tuple[tuple[int, ...], ...]

    def local(self, rank: int) -> int:
        return sum(self.per_rank[rank])

    def total(self) -> int:
        return sum(map(sum, self.per_rank))

    def to_canonical(self, device) -> torch.Tensor | None:
        """Index that puts the rank-major gathered sequence in canonical order (``None``: already is)."""
        if len(self.per_rank[0]) == 1:
            return None
        starts, pos = [], 0
        for parts in self.per_rank:
            offsets = []
            for size in parts:
                offsets.append(pos)
                pos += size
            starts.append(offsets)
        idx = [torch.arange(starts[r][p], starts[r][p] + self.per_rank[r][p])
               for p in range(len(self.per_rank[0])) for r in range(len(self.per_rank))]
        return torch.cat(idx).to(device)


def _segments(*parts: list[int]) -> _Segments:
    """``parts``: the per-rank sizes of each consecutive part of a rank's local sequence, in the order of the
    unsharded sequence (each rank holds its share of every part, in the same order)."""
    return _Segments(tuple(tuple(sizes[r] for sizes in parts) for r in range(len(parts[0]))))


def _text_sizes(local: int, plan: ParallelPlan, device) -> list[int]:
    """Every rank's text share: equal shares, or (ragged splits) one all-gather of the local counts."""
    if not plan.ragged:
        return [local] * plan.world
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(plan.world)]
    dist.all_gather(got, mine, group=plan.group)
    return [int(g) for g in got]


def query_segments(layout, kind: str, text_first: bool, q_local: int, plan: ParallelPlan, device) -> _Segments:
    """The queries' segments: visual only (self, cross) or the joint call's text and visual shares (text first:
    the family's ``joint_text == "before"``; ``layout`` is the forward's base layout, which has no text)."""
    visual = split_sizes(layout.visual_len, plan.world)
    if kind != "joint":
        return _segments(visual)
    text = _text_sizes(q_local - visual[plan.rank], plan, device)
    return _segments(text, visual) if text_first else _segments(visual, text)


def key_segments(kind: str, q_seg: _Segments, k_local: int, text_sharded: bool, plan: ParallelPlan,
                 device) -> _Segments | None:
    """The keys' segments, or ``None`` when every rank holds all of them (a text context the CP plan leaves
    whole, as Wan's: ``Family.cp_text_sharded``)."""
    if kind != "cross":
        return q_seg
    if not text_sharded:
        return None
    return _segments(_text_sizes(k_local, plan, device))


def _check_local(what: str, got: int, seg: _Segments, rank: int, site_name) -> None:
    if got != seg.local(rank) or min(map(min, seg.per_rank)) < 0:
        raise ContextParallelError(
            f"attnproc: {site_name}: this rank's {what} has {got} tokens, but the layout's sequence "
            f"({seg.total()} tokens split over {len(seg.per_rank)} ranks) gives it {seg.local(rank)}. The step hook "
            "must see the unsharded inputs: call model.enable_parallelism(...) before attnproc.apply(...), with a "
            "CP plan that splits the visual and text sequences")


# ---- Ulysses -------------------------------------------------------------------------------------------------
def _gather_seq(x: torch.Tensor, seg: _Segments, plan: ParallelPlan, heads: list[int]) -> torch.Tensor:
    """[B, H, S_local, D] sharded by sequence -> [B, H_r, S, D] for this rank's heads, canonical order."""
    starts = [sum(heads[:j]) for j in range(plan.world)]
    chunks = [x[:, starts[j]:starts[j] + heads[j]] for j in range(plan.world)]
    B, _, _, D = x.shape
    recv = [(B, heads[plan.rank], seg.local(j), D) for j in range(plan.world)]
    full = torch.cat(_all_to_all(chunks, recv, plan.group), dim=2)
    idx = seg.to_canonical(x.device)
    return full if idx is None else full.index_select(2, idx)


def _scatter_seq(out: torch.Tensor, seg: _Segments, plan: ParallelPlan, heads: list[int]) -> torch.Tensor:
    """Inverse of :func:`_gather_seq` for the output: [B, H_r, S, Dv] -> [B, H, S_local, Dv]."""
    idx = seg.to_canonical(out.device)
    if idx is not None:
        out = out.index_select(2, torch.argsort(idx))
    chunks = list(out.split([seg.local(j) for j in range(plan.world)], dim=2))
    B, _, _, Dv = out.shape
    recv = [(B, heads[j], seg.local(plan.rank), Dv) for j in range(plan.world)]
    return torch.cat(_all_to_all(chunks, recv, plan.group), dim=1)


def _gather_mask(mask: torch.Tensor | None, k_seg: _Segments | None, plan: ParallelPlan, k_local: int,
                 heads: range, num_heads: int, site_name) -> torch.Tensor | None:
    """A key mask (``[.., 1, K]``) for the gathered keys; per-head masks keep this rank's heads."""
    if mask is None:
        return None
    if mask.ndim == 4 and mask.shape[-2] != 1:
        raise ContextParallelError(f"attnproc: {site_name}: an attention mask over queries and keys "
                                   f"{tuple(mask.shape)} is not supported under context parallelism (key masks are)")
    full = k_seg.total() if k_seg is not None else k_local
    if mask.shape[-1] == k_local and k_seg is not None and full != k_local:  # a local key mask: gather it
        shapes = [mask.shape[:-1] + (k_seg.local(j),) for j in range(plan.world)]
        padded = max(k_seg.local(j) for j in range(plan.world))
        pad = torch.nn.functional.pad(mask, (0, padded - mask.shape[-1]))
        bufs = [torch.empty_like(pad) for _ in range(plan.world)]
        dist.all_gather(bufs, pad.contiguous(), group=plan.group)
        parts = [b[..., :s[-1]] for b, s in zip(bufs, shapes)]
        mask = torch.cat(parts, dim=-1)
        idx = k_seg.to_canonical(mask.device)
        mask = mask if idx is None else mask.index_select(-1, idx)
    elif mask.shape[-1] != full:
        raise ContextParallelError(f"attnproc: {site_name}: attention mask with {mask.shape[-1]} keys matches neither "
                                   f"the local ({k_local}) nor the full ({full}) key sequence")
    if mask.ndim == 4 and mask.shape[1] == num_heads and num_heads > 1:
        mask = mask[:, heads.start:heads.stop]
    return mask


def ulysses(q, k, v, attn_mask, *, plan: ParallelPlan, layout, kind: str, family, site_name, run):
    """Ulysses around ``run(q, k, v, attn_mask, heads)`` (``heads``: the global head indices of the call it gets,
    which holds the whole sequence in canonical order); returns this rank's local output ``[B, H, S_local, Dv]``."""
    H = q.shape[1]
    heads = split_sizes(H, plan.world)
    mine = range(sum(heads[:plan.rank]), sum(heads[:plan.rank + 1]))
    q_seg = query_segments(layout, kind, family.joint_text == "before", q.shape[2], plan, q.device)
    _check_local("queries", q.shape[2], q_seg, plan.rank, site_name)
    k_seg = key_segments(kind, q_seg, k.shape[2], family.cp_text_sharded, plan, q.device)
    if k_seg is None:
        kf, vf = k[:, mine.start:mine.stop], v[:, mine.start:mine.stop]
    else:
        _check_local("keys", k.shape[2], k_seg, plan.rank, site_name)
        kf, vf = _gather_seq(k, k_seg, plan, heads), _gather_seq(v, k_seg, plan, heads)
    qf = _gather_seq(q, q_seg, plan, heads)
    mask = _gather_mask(attn_mask, k_seg, plan, k.shape[2], mine, H, site_name)
    if len(mine):
        out = run(qf, kf, vf, mask, mine)
    else:  # more ranks than heads: this rank computes nothing
        out = qf.new_empty(qf.shape[:3] + (v.shape[-1],))
    return _scatter_seq(out, q_seg, plan, heads)
