"""The selection layer shared by the query-dependent sparse methods (VMoBA, Rectified SpaAttn).

Both methods reorder the visual tokens so that a chunk (block) of consecutive tokens is a compact piece of the
video, pool queries/keys per chunk, score chunk pairs, keep a top-k or cumulative-threshold set per query (or
query block), and run attention over the kept key chunks only. This module holds those steps once:

* :class:`Partition`: a token permutation with its chunk boundaries (``permute`` once before attention,
  ``unpermute`` the output once after); :func:`box_partition` (raster boxes, ragged at the grid edge) and
  :func:`permutation_partition` (any layout order cut into equal blocks, e.g. a Gilbert curve);
* :func:`chunk_means`: per-chunk mean of q/k/v over the chunk's real tokens, in float32;
* :func:`keep_first` / :func:`keep_prefix`: keep the first ``count`` entries of a stable descending sort
  (a fixed count, or one decided from the sorted values), scattered back;
* :func:`chunk_attention`: exact softmax attention where every query attends its own set of key chunks
  (query-token granularity, as VMoBA needs): the queries of each key chunk are gathered into query blocks and
  run through :func:`attnproc.kernels.block_sparse_attention`, and the partial results are merged by LSE.

Nothing here builds an ``N x N`` tensor; the largest selection tensor is ``[B, H, chunks, N]``.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from attnproc.kernels import block_sparse_attention, num_blocks

__all__ = ["Partition", "box_partition", "permutation_partition", "chunk_means", "keep_first", "keep_prefix",
           "chunk_attention"]


@dataclass(frozen=True)
class Partition:
    """Visual tokens in a layout order, cut into chunks of consecutive tokens.

    ``perm`` (``None`` = identity): ``x_layout = x[..., perm, :]`` for raster-order ``x``; ``inverse`` undoes it.
    ``lengths``: the chunk lengths in layout order (they sum to ``N``). ``chunk_of`` ``[N]``: chunk id of each
    layout position.
    """

    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    lengths: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.lengths)

    @property
    def size(self) -> int:
        return sum(self.lengths)

    @functools.cached_property
    def chunk_of(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.num_chunks), torch.tensor(self.lengths))

    @functools.cached_property
    def starts(self) -> torch.Tensor:
        return torch.tensor((0,) + tuple(itertools.accumulate(self.lengths))[:-1])

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Raster order -> layout order along dim -2 (``[..., N, D]``)."""
        return x if self.perm is None else x.index_select(-2, self.perm.to(x.device))

    def unpermute(self, x: torch.Tensor) -> torch.Tensor:
        """Layout order -> raster order along dim -2."""
        return x if self.inverse is None else x.index_select(-2, self.inverse.to(x.device))

    def permute_positions(self, raster_index: torch.Tensor) -> torch.Tensor:
        """Layout position of each raster token index."""
        return raster_index if self.inverse is None else self.inverse[raster_index]


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


@functools.lru_cache(maxsize=128)
def box_partition(grid: tuple[int, ...], box: tuple[int, ...]) -> Partition:
    """Boxes of ``box`` tokens tiling ``grid`` (frame-major raster order), boxes in raster order, raster order
    inside each box. A grid side that ``box`` does not divide ends with a smaller (ragged) box, so any grid works;
    when every side divides, this is :func:`attnproc.sparse._tiles.tile_permutation` with equal chunks."""
    grid, box = tuple(int(g) for g in grid), tuple(int(b) for b in box)
    if len(grid) != len(box):
        raise ValueError(f"box {box} must have one side per grid dimension {grid}")
    if any(b < 1 or b > g for g, b in zip(grid, box)):
        raise ValueError(f"every box side must be in [1, grid side]; got box {box} for grid {grid}")
    n = math.prod(grid)
    idx = torch.arange(n).reshape(grid)
    counts = [num_blocks(g, b) for g, b in zip(grid, box)]
    pieces, lengths = [], []
    for cell in itertools.product(*(range(c) for c in counts)):
        sl = tuple(slice(i * b, min((i + 1) * b, g)) for i, b, g in zip(cell, box, grid))
        part = idx[sl].reshape(-1)
        pieces.append(part)
        lengths.append(part.numel())
    perm = torch.cat(pieces)
    if torch.equal(perm, torch.arange(n)):
        return Partition(None, None, tuple(lengths))
    return Partition(perm, _inverse(perm), tuple(lengths))


def permutation_partition(perm: torch.Tensor | None, n: int, block: int) -> Partition:
    """Tokens reordered by ``perm`` (``None``: raster order) and cut into blocks of ``block`` tokens (the last
    one shorter when ``block`` does not divide ``n``)."""
    nb = num_blocks(n, block)
    lengths = tuple([block] * (nb - 1) + [n - (nb - 1) * block])
    if perm is None:
        return Partition(None, None, lengths)
    perm = perm.to(torch.long)
    return Partition(perm, _inverse(perm), lengths)


def chunk_means(x: torch.Tensor, part: Partition) -> torch.Tensor:
    """``[B, H, N, D]`` in layout order -> ``[B, H, C, D]`` float32 means over each chunk's real tokens."""
    lengths = part.lengths
    xf = x.float()
    if len(set(lengths[:-1])) <= 1 and lengths[-1] == lengths[0]:
        L = lengths[0]
        return xf.reshape(*x.shape[:2], len(lengths), L, x.shape[-1]).mean(dim=-2)
    sums = xf.new_zeros(*x.shape[:2], part.num_chunks, x.shape[-1])
    sums.index_add_(2, part.chunk_of.to(x.device), xf)
    return sums / torch.tensor(lengths, dtype=torch.float32, device=x.device)[:, None]


def keep_first(scores: torch.Tensor, count: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """bool mask of the ``count`` largest entries along ``dim`` (``count`` broadcasts against ``scores`` with
    ``dim`` reduced to size 1). Ties go to the lower index (stable descending sort), so the choice is
    deterministic on every device."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices
    n = scores.shape[dim]
    shape = [1] * scores.dim()
    shape[dim] = n
    rank = torch.arange(n, device=scores.device).reshape(shape)
    keep_sorted = rank < count
    out = torch.zeros_like(keep_sorted.expand_as(scores))
    return out.scatter(dim, order, keep_sorted.expand_as(scores))


def keep_prefix(scores: torch.Tensor, count_of: Callable, probes: Sequence[int] = ()) -> torch.Tensor:
    """bool mask of the first ``count`` entries of each row's stable descending sort along the last dim, where
    ``count = count_of(sorted_values, complete)`` (``[..., 1]``; with ``complete=False`` it may return 0 for
    "not decided within these values").

    Partial sorts (``topk``) of the ``probes`` sizes are tried first, smallest first; one is used where every
    row's prefix ends inside it and the boundary value's ties all lie inside it too (they are then resolved
    to the lowest indices, as the stable sort does), so the kept set is exactly the full sort's (prefix sums
    of equal values do not depend on their order). Otherwise: one full sort."""
    M = scores.shape[-1]
    for probe in sorted(p for p in probes if p < M):
        vals, idx = torch.topk(scores, probe, dim=-1, largest=True, sorted=True)
        count = count_of(vals, False)
        if not bool(((count >= 1) & (count < probe)).all()):
            continue
        edge = vals.gather(-1, count - 1)  # value of the last kept entry
        if not bool((vals[..., -1:] < edge).all()):
            continue  # the boundary ties may continue past the probe
        above = vals > edge
        tied = vals == edge
        slots = count - above.sum(-1, keepdim=True)  # how many of the tied entries are kept
        # among the tied entries, the lowest original indices first (the stable sort's order)
        tie_rank = torch.sort(torch.where(tied, idx, M), dim=-1).values
        cutoff = tie_rank.gather(-1, slots - 1)
        keep = above | (tied & (idx <= cutoff))
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, idx, keep)
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    keep = torch.arange(M, device=scores.device) < count_of(vals, True)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, order, keep.expand_as(order))


# ---- attention with per-query key-chunk sets ---------------------------------------------------------------
def _query_block(counts: torch.Tensor, block_max: int) -> int:
    """Query block size for packing: about the mean number of queries per (b, h, chunk), so padding stays small
    and kernel calls stay few."""
    nz = counts[counts > 0]
    mean = float(nz.float().mean()) if nz.numel() else 1.0
    return int(min(max(16, 2 ** round(math.log2(max(mean, 1.0)))), block_max))


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: Partition, select: torch.Tensor,
                    scale: float, *, extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                    block_max: int = 512, backend: str = "auto") -> torch.Tensor:
    """Softmax attention where query ``s`` of head ``h`` attends every key of the chunks ``c`` with
    ``select[b, h, c, s]`` (one softmax over their union), plus every extra key.

    ``q, k, v``: ``[B, H, N, D]`` in layout order; ``select``: bool ``[B, H, C, N]`` (every query needs at least
    one chunk or extra keys). Like the reference's varlen "experts", the queries that selected chunk ``c`` are
    gathered and attend chunk ``c`` alone; here they are packed into query blocks (a power of two near the mean
    number of queries per chunk, at most ``block_max``) so that one
    :func:`block_sparse_attention` call per distinct chunk length serves all chunks, heads and batch elements
    (one-hot block mask, LSE returned), and the partial results are merged exactly by their LSE. Differentiable
    (the gather backend keeps the graph)."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    C = part.num_chunks
    if select.shape != (B, H, C, N):
        raise ValueError(f"select must be [B, H, C, N] = {(B, H, C, N)}; got {tuple(select.shape)}")
    dev = q.device
    lengths = torch.tensor(part.lengths)
    starts = part.starts
    outs, lses, rows = [], [], []
    for L in sorted(set(part.lengths)):
        chunks = torch.nonzero(lengths == L).flatten()  # chunks of this length
        G = chunks.numel()
        sel = select[:, :, chunks.to(dev)]  # [B, H, G, N]
        # keys of this group: the chunks back to back, each one key block of L tokens
        key_idx = (starts[chunks][:, None] + torch.arange(L)[None, :]).reshape(-1).to(dev)
        kg, vg = k.index_select(2, key_idx), v.index_select(2, key_idx)
        # queries of each (b, h, chunk), padded to whole query blocks, packed per (b, h)
        counts = sel.sum(-1)  # [B, H, G]
        block_q = _query_block(counts, block_max)
        nblk = (counts + block_q - 1) // block_q  # query blocks per (b, h, chunk)
        blk_start = torch.cumsum(nblk, -1) - nblk  # first query block of each chunk, per (b, h)
        nq = max(int(nblk.sum(-1).max()), 1)
        b_i, h_i, g_i, s_i = torch.nonzero(sel, as_tuple=True)  # sorted by (b, h, g, s)
        # rank of each selected query inside its (b, h, g) group
        flat_group = (b_i * H + h_i) * G + g_i
        group_first = torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1)
        rank = torch.arange(flat_group.numel(), device=dev) - group_first[flat_group]
        slot = blk_start[b_i, h_i, g_i] * block_q + rank  # packed query position
        Sq = nq * block_q
        src = torch.zeros(B, H, Sq, dtype=torch.long, device=dev)
        src[b_i, h_i, slot] = s_i
        qp = q.gather(2, src[..., None].expand(B, H, Sq, D))
        # one-hot block mask: query block -> its chunk (padding blocks point at chunk 0, results dropped)
        owner = torch.zeros(B, H, nq, dtype=torch.long, device=dev)
        blk_b, blk_h, blk_g = torch.nonzero(nblk, as_tuple=True)
        for_rep = nblk[blk_b, blk_h, blk_g]
        rep_b, rep_h, rep_g = (torch.repeat_interleave(t, for_rep) for t in (blk_b, blk_h, blk_g))
        first = torch.repeat_interleave(blk_start[blk_b, blk_h, blk_g], for_rep)
        offs = torch.arange(rep_b.numel(), device=dev) - torch.repeat_interleave(
            torch.cumsum(for_rep, 0) - for_rep, for_rep)
        owner[rep_b, rep_h, first + offs] = rep_g
        bmask = torch.nn.functional.one_hot(owner, G).bool()
        out, lse = block_sparse_attention(qp, kg, vg, bmask, (block_q, L), scale=scale, return_lse=True,
                                          backend=backend)
        outs.append(out[b_i, h_i, slot])
        lses.append(lse[b_i, h_i, slot])
        rows.append((b_i * H + h_i) * N + s_i)
    if extra_k is not None and extra_k.shape[2] > 0:
        ones = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
        out, lse = block_sparse_attention(q, extra_k, extra_v, ones, (N, extra_k.shape[2]), scale=scale,
                                          return_lse=True, backend=backend)
        outs.append(out.reshape(B * H * N, Dv))
        lses.append(lse.reshape(-1))
        rows.append(torch.arange(B * H * N, device=dev))
    out_e, lse_e, row_e = torch.cat(outs), torch.cat(lses).float(), torch.cat(rows)
    # exact LSE merge of every partial result of a query (the shift by the row max only keeps exp() in range)
    m = torch.full((B * H * N,), float("-inf"), device=dev).scatter_reduce(
        0, row_e, lse_e.detach(), "amax", include_self=True)
    w = torch.exp(lse_e - m[row_e])
    den = torch.zeros(B * H * N, device=dev, dtype=torch.float32).index_add(0, row_e, w)
    num = torch.zeros(B * H * N, Dv, device=dev, dtype=torch.float32).index_add(0, row_e, w[:, None] * out_e.float())
    return (num / den[:, None]).reshape(B, H, N, Dv).to(q.dtype)
