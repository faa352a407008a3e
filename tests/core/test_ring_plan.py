"""Ring context parallelism's plan and pair kernel, on one process (the torchrun parity is in
test_context_parallel.py): which key shards and tiles each query shard skips, and that attending only the kept
tiles and merging by log-sum-exp is the masked softmax."""
import pytest
import torch

from attnproc.kernels import block_to_token_mask, merge_attention
from attnproc.parallel import _segments, split_sizes
from attnproc.ring import BlockPattern, _pair_attention, ring_plan, shard_positions
from attnproc.sparse.gna import gna_mask
from attnproc.sparse.radial import radial_block_mask


def test_shard_positions_of_a_joint_call_are_the_unsharded_positions():
    # 5 text tokens then 7 visual tokens, split over 2 ranks: rank 0 holds text 0-2 and visual 5-8
    seg = _segments(split_sizes(5, 2), split_sizes(7, 2))
    pos = shard_positions(seg)
    assert pos[0].tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert pos[1].tolist() == [3, 4, 9, 10, 11]


def _brute_tiles(mask, qp, kp, tile):
    sub = mask[qp][:, kp]
    nq, nk = -(-len(qp) // tile), -(-len(kp) // tile)
    return torch.tensor([[bool(sub[a * tile:(a + 1) * tile, b * tile:(b + 1) * tile].any()) for b in range(nk)]
                         for a in range(nq)])


def test_plan_matches_a_brute_force_tile_scan():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(70, 70, generator=g) < 0.02
    mask[:, 40:] = False  # key shard 2 (tokens 36-52) partly and shard 3 (53-69) wholly unused
    seg = _segments(split_sizes(70, 4))
    pos = shard_positions(seg)
    plan = ring_plan(BlockPattern.of_tokens(mask), pos, pos, tile=8)
    for r in range(4):
        for j in range(4):
            want = _brute_tiles(mask, pos[r], pos[j], 8)
            got = plan.tiles[r][j]
            assert (got is None) == (not bool(want.any())), (r, j)
            if got is not None:
                assert torch.equal(got, want), (r, j)
    assert all(not plan.needs(r, 3) for r in range(4))


def test_radial_ring_on_the_tiny_wan_grid_skips_tiles():
    """Tiny Wan 2.1 at 9x128x128 (3 frames of 8x8 tokens), radial block 16, Ring degree 2: what the parity
    cases in test_context_parallel.py run. Some tiles are skipped; no whole shard is (each half of the video
    attends the other half's first frame, the radial sink)."""
    frames, per_frame = 3, 64
    blocks = radial_block_mask(frames, per_frame, block_size=16)
    mask = block_to_token_mask(blocks, 16, 192, 192)
    pos = shard_positions(_segments(split_sizes(192, 2)))
    plan = ring_plan(BlockPattern(blocks, torch.arange(192) // 16, torch.arange(192) // 16), pos, pos, tile=16)
    tiles = plan.tile_counts([96, 96], [96, 96])
    assert plan.counts() == {"shard_pairs": 4, "shard_pairs_skipped": 0}
    kept = int(sum(_brute_tiles(mask, pos[r], pos[j], 16).sum() for r in range(2) for j in range(2)))
    assert tiles == {"tiles": 144, "tiles_skipped": 144 - kept}
    assert tiles["tiles_skipped"] > 0


def test_gna_ring_skips_whole_shards_on_a_long_video():
    """A neighbourhood window of 3 frames over 16 frames of 4x4 tokens, Ring degree 4: a query shard (4 frames)
    never sees a key shard two shards away, so those pairs are neither sent nor attended."""
    mask = gna_mask((16, 4, 4), (3, 3, 3))
    pos = shard_positions(_segments(split_sizes(256, 4)))
    plan = ring_plan(BlockPattern.of_tokens(mask), pos, pos, tile=16)
    needed = [[plan.needs(r, j) for j in range(4)] for r in range(4)]
    assert needed == [[abs(r - j) <= 1 for j in range(4)] for r in range(4)]
    assert plan.counts() == {"shard_pairs": 16, "shard_pairs_skipped": 6}


def test_pair_kernel_over_kept_tiles_merged_is_the_masked_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (40, 50, 50))
    mask = torch.rand(40, 50, generator=g) < 0.1
    mask[:16] = False
    mask[:16, 45] = True  # the first tile rows see one key of the second shard only
    mask[30] = False      # a row with no key at all
    bias = torch.zeros(2, 1, 1, 50)
    bias[1, ..., 3] = float("-inf")  # a padded key in batch element 1
    shards = [slice(0, 24), slice(24, 50)]
    out = lse = None
    skipped = 0
    for s in shards:
        keep = mask[:, s]
        plan = ring_plan(BlockPattern.of_tokens(keep), [torch.arange(40)], [torch.arange(s.stop - s.start)], tile=8)
        tiles = plan.tiles[0][0]
        skipped += int((~tiles).sum())
        o, l = _pair_attention(q, k[:, :, s], v[:, :, s], lambda rows, cols, keep=keep: keep[rows][:, cols], tiles,
                               bias[..., s], 8 ** -0.5, 8)
        out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
    assert skipped > 0
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5 + bias
    s = s.masked_fill(~mask, float("-inf"))
    want = torch.softmax(s, -1).nan_to_num(0.0) @ v
    rows = torch.ones(40, dtype=torch.bool)
    rows[30] = False
    assert torch.allclose(out[:, :, rows], want[:, :, rows], atol=1e-6)
    assert torch.isneginf(lse[:, :, 30]).all() and (out[:, :, 30] == 0).all()


@pytest.mark.parametrize("method, options, grid", [
    ("radial", dict(block_size=16), (3, 8, 8)),
    ("gna", dict(block_target=32, kernel_size=(3, 5, 5), stride=1, exact=False), (3, 9, 9)),  # tile blocks
    ("gna", dict(block_target=32, kernel_size=(3, 5, 5), stride=1), (3, 9, 9)),  # exact, not aligned: tokens
])
@pytest.mark.parametrize("kind", ["self", "joint"])
def test_ring_pattern_is_the_methods_token_mask(method, options, grid, kind):
    """What Ring attends (a block pattern, never an N x N mask for radial or aligned gna) is the pattern the
    method computes on one process: its token mask over the whole call, text rows and columns kept."""
    import attnproc
    from attnproc.families import FAMILIES
    from attnproc.layout import TokenLayout
    from attnproc.site import Site

    base = TokenLayout(*grid)
    fam = FAMILIES["hunyuanvideo" if kind == "joint" else "wan"]
    n = base.visual_len + (5 if kind == "joint" else 0)
    layout = fam.site_layout(base, kind, n, n, None)
    site = Site(family=fam.name, denoiser="transformer", name="blocks.0.attn1", index=0, layer=0, kind=kind,
                layout=layout, step=None)
    m = attnproc.create(method, dense_first_steps=0, **({"dense_first_layers": 0} if method == "radial" else {}),
                        **options)
    pattern = m.ring_mask(site, n, n)
    want = m.token_mask(site, n, n)[0]
    if kind == "joint":  # visual rows see every text key (the key mask trims padding at run time)
        want[layout.visual_slice, layout.text_slice] = True
    assert torch.equal(pattern.tokens(torch.arange(n), torch.arange(n)), want)
    assert not bool(want.all())
    if options.get("exact", True) is False or method == "radial":
        assert pattern.blocks.numel() < n * n  # block form
