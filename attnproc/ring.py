"""Ring context parallelism for methods whose attention is softmax under a static mask (dense, radial, gna).

Each rank keeps its query shard. Because the mask depends only on the layout, every rank can work out, without
communicating, which (query shard, key shard) pairs hold a kept pair and, inside each pair, which tiles of
``TILE x TILE`` tokens do (:func:`ring_plan`). A rank then receives only the key/value shards it needs (one
all-to-all whose empty chunks cost nothing), attends each needed shard over its kept tiles only, and merges the
partial results by log-sum-exp (:func:`attnproc.kernels.merge_attention`): the same softmax as one process.

The mask is over the call's canonical (unsharded) sequence; the shards are diffusers' (``parallel._Segments``),
so a joint call's ``[text_r, visual_r]`` shards map to their true positions. Methods whose selection depends on
the keys themselves (vmoba, rectified) are not served here: they declare Ulysses only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import merge_attention
from .parallel import ParallelPlan, _all_to_all, _check_local, _gather_mask, _Segments, key_segments, \
    query_segments

__all__ = ["TILE", "BlockPattern", "RingPlan", "ring_plan", "shard_positions", "ring"]

TILE = 64  # tokens per side of the tiles a rank skips inside a shard pair


def shard_positions(seg: _Segments) -> list[torch.Tensor]:
    """Per rank, the canonical positions of its local tokens, in its local order."""
    idx = seg.to_canonical("cpu")
    total = seg.total()
    rank_major = torch.arange(total) if idx is None else torch.argsort(idx)
    out, start = [], 0
    for r in range(len(seg.per_rank)):
        n = seg.local(r)
        out.append(rank_major[start:start + n])
        start += n
    return out


@dataclass(frozen=True)
class BlockPattern:
    """A static mask over a whole call, kept small: query ``i`` attends key ``j`` iff
    ``blocks[q_block[i], k_block[j]]``. Radial and gna give their block masks (blocks of tokens); any token mask
    is the pattern with one block per token (:meth:`of_tokens`). Nothing of size ``Sq x Sk`` is built from it
    except the rows one tile attends."""

    blocks: torch.Tensor   # bool [query blocks, key blocks]
    q_block: torch.Tensor  # long [Sq]: the block of each query (canonical order)
    k_block: torch.Tensor  # long [Sk]

    @classmethod
    def of_tokens(cls, mask: torch.Tensor) -> "BlockPattern":
        return cls(mask, torch.arange(mask.shape[0]), torch.arange(mask.shape[1]))

    def tokens(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """bool ``[len(q_idx), len(k_idx)]``: the mask at these canonical positions."""
        return self.blocks[self.q_block[q_idx]][:, self.k_block[k_idx]]

    def tiles(self, q_idx: torch.Tensor, k_idx: torch.Tensor, tile: int) -> torch.Tensor:
        """bool ``[ceil(len(q_idx)/tile), ceil(len(k_idx)/tile)]``: which tiles of ``tokens(q_idx, k_idx)`` hold a
        kept pair, from the blocks each tile touches (no token mask is built)."""
        def touched(blocks_of, idx, n):
            rows = torch.arange(len(idx)) // tile
            inc = torch.zeros(-(-len(idx) // tile), n)
            inc[rows, blocks_of[idx]] = 1.0
            return inc
        inc_q = touched(self.q_block, q_idx, self.blocks.shape[0])
        inc_k = touched(self.k_block, k_idx, self.blocks.shape[1])
        return (inc_q @ self.blocks.float() @ inc_k.T) > 0


@dataclass(frozen=True)
class RingPlan:
    """``tiles[r][j]``: the kept tiles (bool ``[q tiles, k tiles]``) of query shard ``r`` against key shard ``j``,
    or ``None`` where the pair keeps nothing (the shard is neither sent nor attended)."""

    tiles: tuple[tuple[torch.Tensor | None, ...], ...]
    tile: int

    def needs(self, r: int, j: int) -> bool:
        return self.tiles[r][j] is not None

    def counts(self) -> dict[str, int]:
        """Shard pairs and tiles: how many there are and how many are skipped (over every rank)."""
        pairs = [t for row in self.tiles for t in row]
        return {"shard_pairs": len(pairs), "shard_pairs_skipped": sum(t is None for t in pairs)}

    def tile_counts(self, q_sizes: list[int], k_sizes: list[int]) -> dict[str, int]:
        """Tiles in every pair and those skipped (whole skipped pairs included)."""
        total = skipped = 0
        for r, row in enumerate(self.tiles):
            for j, t in enumerate(row):
                n = -(-q_sizes[r] // self.tile) * -(-k_sizes[j] // self.tile)
                total += n
                skipped += n if t is None else n - int(t.sum())
        return {"tiles": total, "tiles_skipped": skipped}


def ring_plan(pattern: BlockPattern | None, q_pos: list[torch.Tensor], k_pos: list[torch.Tensor],
              tile: int = TILE) -> RingPlan:
    """The :class:`RingPlan` of ``pattern`` (``None``: every pair) for query shards at ``q_pos`` and key shards
    at ``k_pos`` (:func:`shard_positions`)."""
    rows = []
    for qp in q_pos:
        row = []
        for kp in k_pos:
            if pattern is None:
                t = torch.ones(-(-len(qp) // tile), -(-len(kp) // tile), dtype=torch.bool)
            else:
                t = pattern.tiles(qp, kp, tile)
            row.append(t if bool(t.any()) else None)
        rows.append(tuple(row))
    return RingPlan(tuple(rows), tile)


def _key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key mask as an additive float bias (``-inf`` where a bool mask is False), 4-d."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask.float()


def _pair_attention(q, k, v, keep, tiles, bias, scale, tile):
    """Queries ``q`` against one key shard over its kept tiles only: ``(out, lse)`` in float32, ``lse = -inf`` and
    ``out = 0`` for rows with no kept key. ``keep(rows, cols)``: the bool mask of those local rows (a slice) and
    key columns, or ``None`` (every pair)."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    outs, lses = [], []
    for i in range(tiles.shape[0]):
        rows = slice(i * tile, min(Sq, (i + 1) * tile))
        cols = (torch.nonzero(tiles[i]).flatten()[:, None] * tile + torch.arange(tile)).flatten()
        cols = cols[cols < Sk].to(q.device)
        s = torch.matmul(q[:, :, rows].float(), k.index_select(2, cols).float().transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.index_select(-1, cols)
        if keep is not None:
            s = s.masked_fill(~keep(rows, cols.cpu()).to(q.device), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        finite = torch.isfinite(lse)
        p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
        outs.append(torch.matmul(p, v.index_select(2, cols).float()))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def ring(q, k, v, attn_mask, *, plan: ParallelPlan, layout, kind: str, family, site_name, run, pattern,
         scale=None, tile: int = TILE):
    """Ring around a static-mask method: ``pattern(q_len, k_len, key_mask)`` gives the method's
    :class:`BlockPattern` over the canonical sequence (``None``: every pair). Keys the CP plan left whole (Wan's text
    context) need no exchange: ``run(q, k, v, attn_mask, None, q_len)`` attends them locally. Returns the local
    output ``[B, H, S_local, Dv]``."""
    q_seg = query_segments(layout, kind, family.joint_text == "before", q.shape[2], plan, q.device)
    _check_local("queries", q.shape[2], q_seg, plan.rank, site_name)
    k_seg = key_segments(kind, q_seg, k.shape[2], family.cp_text_sharded, plan, q.device)
    if k_seg is None:
        return run(q, k, v, attn_mask, None, q_seg.total())
    _check_local("keys", k.shape[2], k_seg, plan.rank, site_name)
    B, H, _, D = q.shape
    Dv, me = v.shape[-1], plan.rank
    key_mask = _gather_mask(attn_mask, k_seg, plan, k.shape[2], range(H), H, site_name)
    mask = pattern(q_seg.total(), k_seg.total(), key_mask)
    q_pos, k_pos = shard_positions(q_seg), shard_positions(k_seg)
    rp = ring_plan(mask, q_pos, k_pos, tile)
    kv = torch.cat([k, v], dim=-1)
    send = [kv if r != me and rp.needs(r, me) else kv[:, :, :0] for r in range(plan.world)]
    recv = [(B, H, k_seg.local(j) if j != me and rp.needs(me, j) else 0, D + Dv) for j in range(plan.world)]
    shards = _all_to_all(send, recv, plan.group)
    shards[me] = kv
    bias = _key_bias(key_mask)
    scale = scale if scale is not None else D ** -0.5
    out = lse = None
    for j in range(plan.world):
        if not rp.needs(me, j):
            continue
        kj, vj = shards[j].split([D, Dv], dim=-1)
        keep = None if mask is None else \
            (lambda rows, cols, kp=k_pos[j]: mask.tokens(q_pos[me][rows], kp[cols]))
        bj = None if bias is None else bias.index_select(-1, k_pos[j].to(bias.device))
        o, l = _pair_attention(q, kj, vj, keep, rp.tiles[me][j], bj, scale, tile)
        out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
    if out is None:  # no kept key anywhere (a mask that keeps nothing): what SDPA gives such rows
        return q.new_full((B, H, q.shape[2], Dv), float("nan"))
    return out.to(q.dtype)
