"""AgentSD (attnproc.sparse.agent) against a naive reference written from the method notes
(shared/methods/sparse-sla-rectified-agent.md §3): loops and sets, clarity over speed."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from attnproc.options import OptionError, build_config
from attnproc.sparse.agent import (AgentConfig, AgentStep, agent_attention, agent_self_attention, check_family,
                                   merge_grid, pooled_agent_attention, tome_merge)


# ---- the naive reference ----------------------------------------------------------------------------------
def naive_destinations(h, w, sx, sy, batch, generator, use_rand=True):
    """One destination per full sx x sy window: random inside it (one randint over the windows, shape
    (h//sy, w//sx, 1)) for even batches, the top-left token otherwise. Returns the set of token indices."""
    hs, ws = h // sy, w // sx
    if use_rand and batch % 2 == 0:
        offsets = torch.randint(sx * sy, (hs, ws, 1), generator=generator)
    else:
        offsets = torch.zeros(hs, ws, 1, dtype=torch.long)
    dst = set()
    for wy in range(hs):
        for wx in range(ws):
            o = int(offsets[wy, wx, 0])
            row, col = wy * sy + o // sx, wx * sx + o % sx
            dst.add(row * w + col)
    return dst


def naive_groups(metric_b, dst, r):
    """The groups of tokens merged together when the r most similar sources join their best destination."""
    n = metric_b.shape[0]
    dst_list = sorted(dst)
    src_list = [t for t in range(n) if t not in dst]

    unit = metric_b / metric_b.norm(dim=1, keepdim=True)
    cosine = (unit @ unit.T).tolist()  # cosine[i][j] between tokens i and j

    best = {}
    for s in src_list:
        sims = [cosine[s][d] for d in dst_list]
        k = max(range(len(dst_list)), key=lambda i: sims[i])
        best[s] = (sims[k], dst_list[k])
    ranked = sorted(src_list, key=lambda s: -best[s][0])
    r = min(r, len(src_list))
    groups = {d: [d] for d in dst_list}
    for s in ranked[:r]:
        groups[best[s][1]].append(s)
    singles = [[s] for s in ranked[r:]]
    return singles + [groups[d] for d in dst_list]


def naive_merge(metric, x, h, w, sx, sy, ratio, agent_ratio, generator, use_rand=True):
    """Per batch element: (merged groups, agent groups or None), plus group means of ``x``."""
    B, N, _ = metric.shape
    r, agent_r = int(N * ratio), int(N * agent_ratio)
    if r <= 0:
        return [[[t] for t in range(N)]] * B, None
    dst = naive_destinations(h, w, sx, sy, B, generator, use_rand)
    n_src = N - len(dst)
    merged, agents = [], []
    for b in range(B):
        merged.append(naive_groups(metric[b], dst, r))
        agents.append(naive_groups(metric[b], dst, agent_r))
    gate = 2 * (N - min(agent_r, n_src)) < N - min(r, n_src)
    return merged, (agents if gate else None)


def group_means(x, groups_b):
    return torch.stack([x[g].mean(0) for g in groups_b])


def naive_softmax_rows(scores):
    e = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def naive_agent_attention(q, k, v, a, scale, power, shortcut):
    """Per batch and head: V_A = softmax(A K^T scale) V, O = softmax(Q A^T scale^power) V_A + shortcut V."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for hd in range(q.shape[1]):
            va = naive_softmax_rows(a[b, hd] @ k[b, hd].T * scale) @ v[b, hd]
            out[b, hd] = naive_softmax_rows(q[b, hd] @ a[b, hd].T * scale ** power) @ va + shortcut * v[b, hd]
    return out


def naive_softmax_attention(q, k, v, scale):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for hd in range(q.shape[1]):
            out[b, hd] = naive_softmax_rows(q[b, hd] @ k[b, hd].T * scale) @ v[b, hd]
    return out


def naive_self_attention(attn, hidden, metric, h, w, step, generator, power=0.3, shortcut=0.075):
    """AgentSD attn1 from the notes, with the module's weights applied by hand."""
    B, N, C = hidden.shape
    merged_groups, agent_groups = naive_merge(metric, hidden, h, w, step.sx, step.sy, step.ratio,
                                              step.agent_ratio, generator)
    heads = attn.heads
    lin = lambda layer, t: t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    split = lambda t: t.view(1, t.shape[0], heads, -1).transpose(1, 2)  # noqa: E731
    out = torch.empty(B, N, attn.to_out[0].out_features)
    for b in range(B):
        xm = group_means(hidden[b], merged_groups[b])
        q, k, v = split(lin(attn.to_q, xm)), split(lin(attn.to_k, xm)), split(lin(attn.to_v, xm))
        if agent_groups is not None:
            a = split(lin(attn.to_q, group_means(hidden[b], agent_groups[b])))
            o = naive_agent_attention(q, k, v, a, attn.scale, power, shortcut)
        else:
            o = naive_softmax_attention(q, k, v, attn.scale)
        o = lin(attn.to_out[0], o.transpose(1, 2).reshape(len(merged_groups[b]), -1))
        for i, g in enumerate(merged_groups[b]):
            for t in g:
                out[b, t] = o[i]
    return out


# ---- helpers ----------------------------------------------------------------------------------------------
def structured(B, h, w, C, seed):
    """Tokens with spatial structure (a smooth field plus noise) so merges are meaningful."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(B, C, max(h // 4, 1), max(w // 4, 1), generator=g)
    field = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (field + 0.3 * torch.randn(B, C, h, w, generator=g)).flatten(2).transpose(1, 2)


def slots_of(unmerge, B, n_merged):
    """The merged row each token reads from (via unmerge of row labels)."""
    labels = torch.arange(n_merged, dtype=torch.float64).view(1, -1, 1).expand(B, -1, 1)
    return unmerge(labels)[..., 0].long()


def assert_groups(ours, slots, groups, x):
    """Our merged rows are exactly the naive groups: tokens share a row iff they share a group, and the row is
    the group's mean."""
    B = x.shape[0]
    for b in range(B):
        assert ours.shape[1] == len(groups[b])
        for g in groups[b]:
            rows = {int(slots[b, t]) for t in g}
            assert len(rows) == 1, f"group {g} split over rows {rows}"
            torch.testing.assert_close(ours[b, rows.pop()], x[b, g].mean(0), rtol=1e-5, atol=1e-6)
        assert len({int(s) for s in slots[b]}) == len(groups[b])


CASES = [  # (B, h, w, sx, sy, ratio, agent_ratio)
    (1, 8, 8, 2, 2, 0.4, 0.8),
    (2, 8, 8, 2, 2, 0.4, 0.8),
    (2, 12, 12, 4, 4, 0.4, 0.95),   # the early reference setting: agents on
    (2, 12, 12, 2, 2, 0.4, 0.5),    # the late reference setting: gate off, plain ToMe
    (2, 9, 7, 2, 2, 0.4, 0.9),      # latent not divisible by the window
    (1, 13, 11, 4, 3, 0.3, 0.95),   # odd batch, odd sizes, sx != sy
    (2, 10, 14, 4, 4, 0.5, 0.95),
]


@pytest.mark.parametrize("B,h,w,sx,sy,ratio,agent_ratio", CASES)
def test_tome_merge_matches_naive_reference(B, h, w, sx, sy, ratio, agent_ratio):
    C = 16
    metric, x = structured(B, h, w, C, 1), structured(B, h, w, C + 3, 2)
    g_ours, g_naive = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    merged, agents, unmerge = tome_merge(metric, x, (h, w), sx=sx, sy=sy, ratio=ratio, agent_ratio=agent_ratio,
                                         generator=g_ours)
    groups, agent_groups = naive_merge(metric, x, h, w, sx, sy, ratio, agent_ratio, g_naive)
    assert torch.equal(g_ours.get_state(), g_naive.get_state())
    assert merged.shape == (B, h * w - int(h * w * ratio), C + 3)
    assert_groups(merged, slots_of(unmerge, B, merged.shape[1]), groups, x)
    # unmerge copies each merged row to every token of its group
    y = torch.randn(B, merged.shape[1], 5)
    back = unmerge(y)
    slots = slots_of(unmerge, B, merged.shape[1])
    assert torch.equal(back, torch.stack([y[b, slots[b]] for b in range(B)]))
    if agent_groups is None:
        assert agents is None
        return
    n_agent = len(agent_groups[0])
    assert agents is not None and agents.shape == (B, n_agent, C + 3) and 2 * n_agent < merged.shape[1]
    for b in range(B):  # agents as a set of group means (rows of distinct float vectors)
        want = group_means(x[b], agent_groups[b])
        got_sorted = agents[b][agents[b][:, 0].argsort()]
        torch.testing.assert_close(got_sorted, want[want[:, 0].argsort()], rtol=1e-5, atol=1e-6)


def test_reference_worked_example_sd15_early_and_late():
    """The notes' SD 1.5 512^2 numbers: early 256 dst, N' = 2458, 256 agents; late: agents off."""
    B, h, w = 2, 64, 64
    metric = structured(B, h, w, 8, 3)
    merged, agents, _ = tome_merge(metric, metric, (h, w), sx=4, sy=4, ratio=0.4, agent_ratio=0.95,
                                   generator=torch.Generator().manual_seed(0))
    assert merged.shape[1] == 2458 and agents.shape[1] == 256
    merged, agents, _ = tome_merge(metric, metric, (h, w), sx=2, sy=2, ratio=0.4, agent_ratio=0.5,
                                   generator=torch.Generator().manual_seed(0))
    assert merged.shape[1] == 2458 and agents is None


def test_generator_consumption_and_partition():
    h, w, sx, sy = 8, 8, 2, 2
    metric = structured(2, h, w, 8, 4)
    kw = dict(sx=sx, sy=sy, ratio=0.5, agent_ratio=0.8)
    # even batch: exactly one randint(sx*sy, (h//sy, w//sx, 1)) is drawn
    g, expect = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    tome_merge(metric, metric, (h, w), generator=g, **kw)
    torch.randint(sx * sy, (h // sy, w // sx, 1), generator=expect)
    assert torch.equal(g.get_state(), expect.get_state())
    # the same state gives the same partition, another state another one
    lab = lambda seed: slots_of(tome_merge(metric, metric, (h, w), generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                           **kw)[2], 2, 32)
    assert torch.equal(lab(3), lab(3))
    assert not torch.equal(lab(3), lab(4))
    # odd batch, use_rand off and ratio 0 draw nothing
    for m, extra in ((metric[:1], {}), (metric, {"use_rand": False}), (metric, {"ratio": 0.0})):
        g = torch.Generator().manual_seed(11)
        before = g.get_state()
        tome_merge(m, m, (h, w), generator=g, **{**kw, **extra})
        assert torch.equal(g.get_state(), before)
    # no generator: a fork of the default generator, which is left as it was
    state = torch.get_rng_state()
    a = slots_of(tome_merge(metric, metric, (h, w), **kw)[2], 2, 32)
    assert torch.equal(torch.get_rng_state(), state)
    forked = torch.Generator().set_state(state)
    assert torch.equal(a, slots_of(tome_merge(metric, metric, (h, w), generator=forked, **kw)[2], 2, 32))


def test_ratio_zero_is_identity():
    x = torch.randn(2, 16, 4)
    merged, agents, unmerge = tome_merge(x, x, (4, 4), sx=2, sy=2, ratio=0.0, agent_ratio=0.9)
    assert merged is x and agents is None and unmerge(x) is x


@pytest.mark.parametrize("bad,msg", [
    (dict(ratio=1.0), "ratio must be a number in \\[0, 1\\)"),
    (dict(ratio=-0.1), "ratio must be a number in \\[0, 1\\)"),
    (dict(agent_ratio=1.2), "agent_ratio must be a number in \\[0, 1\\)"),
    (dict(sx=9), "sx=9 x sy=2 is larger than the 8x6 token grid"),
    (dict(sy=9), "larger than the 8x6 token grid"),
    (dict(sx=0), "sx must be an integer >= 1"),
])
def test_tome_merge_bad_input(bad, msg):
    x = torch.randn(2, 48, 4)
    with pytest.raises(ValueError, match=msg):
        tome_merge(x, x, (8, 6), **{**dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.9), **bad})
    with pytest.raises(ValueError, match="grid 8x8 has 64 tokens but the input has 48"):
        tome_merge(x, x, (8, 8), sx=2, sy=2, ratio=0.4, agent_ratio=0.9)


@pytest.mark.parametrize("B", [1, 2])
def test_agent_attention_matches_naive(B):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 3, 40, 8, generator=g) for _ in range(3))
    a = torch.randn(B, 3, 7, 8, generator=g)
    ours = agent_attention(q, k, v, a)
    torch.testing.assert_close(ours, naive_agent_attention(q, k, v, a, 8 ** -0.5, 0.3, 0.075), rtol=1e-5, atol=1e-6)
    ours = agent_attention(q, k, v, a, scale=0.2, agent_power=1.0, shortcut=0.0)
    torch.testing.assert_close(ours, naive_agent_attention(q, k, v, a, 0.2, 1.0, 0.0), rtol=1e-5, atol=1e-6)
    # upcast keeps the same math in float32
    up = agent_attention(q.half(), k.half(), v.half(), a.half(), upcast=True)
    assert up.dtype == torch.float16
    torch.testing.assert_close(up.float(), agent_attention(q, k, v, a), rtol=2e-2, atol=2e-2)


def _attn(C=24, heads=3, seed=0):
    torch.manual_seed(seed)
    return Attention(C, heads=heads, dim_head=C // heads, bias=False).eval()


@pytest.mark.parametrize("B,h,w,sx,sy,ratio,agent_ratio", [
    (1, 8, 8, 2, 2, 0.4, 0.8), (2, 12, 12, 4, 4, 0.4, 0.95), (2, 12, 12, 2, 2, 0.4, 0.5), (2, 9, 7, 2, 2, 0.4, 0.9),
    (1, 13, 11, 4, 3, 0.3, 0.95)])
def test_self_attention_path_matches_naive(B, h, w, sx, sy, ratio, agent_ratio):
    attn = _attn()
    block_input = structured(B, h, w, 24, 7)
    hidden = torch.nn.functional.layer_norm(block_input, (24,))
    step = AgentStep(sx, sy, ratio, agent_ratio)
    with torch.no_grad():
        ours = agent_self_attention(attn, hidden, block_input, (h, w), step, generator=torch.Generator().manual_seed(9))
        want = naive_self_attention(attn, hidden, block_input, h, w, step, torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_self_attention_without_merging_is_the_stock_attention():
    attn = _attn(seed=3)
    x = torch.randn(2, 36, 24)
    with torch.no_grad():
        ours = agent_self_attention(attn, x, x, (6, 6), AgentStep(2, 2, 0.0, 0.9))
        torch.testing.assert_close(ours, attn(x), rtol=1e-5, atol=1e-6)


def test_merge_grid_level_rule():
    assert merge_grid((64, 64), 4096) == (64, 64)
    assert merge_grid((64, 64), 1024) is None
    assert merge_grid((64, 64), 1024, max_downsample=2) == (32, 32)
    assert merge_grid((64, 64), 64, max_downsample=8) == (8, 8)
    # odd latent: the UNet rounds up (65 -> 33), the rule's ceil follows it
    assert merge_grid((65, 63), 65 * 63) == (65, 63)
    assert merge_grid((65, 63), 33 * 32, max_downsample=2) == (33, 32)
    # SDXL: no attention at full latent resolution, so the reference default patches nothing
    assert merge_grid((128, 128), 64 * 64) is None


def test_step_schedule_scales_with_step_count():
    cfg = AgentConfig()
    early, late = AgentStep(4, 4, 0.4, 0.95), AgentStep(2, 2, 0.4, 0.5)
    assert [cfg.at_step(i, 50) for i in (0, 19, 20, 49)] == [early, early, late, late]
    assert cfg.switch_step(20) == 8 and cfg.at_step(7, 20) == early and cfg.at_step(8, 20) == late
    assert cfg.at_step(None, None) == early
    assert AgentConfig(early_steps=3).switch_step(50) == 3
    assert cfg.plan((64, 64), 4096, 25, 50) == ((64, 64), late)
    assert cfg.plan((64, 64), 1024, 0, 50) is None
    assert AgentConfig(max_downsample=2).plan((128, 128), 4096, 0, 50) == ((64, 64), early)


def test_config_errors_name_the_option():
    with pytest.raises(OptionError, match="ratio"):
        build_config(AgentConfig, "agent", {"ratio": 1.0})
    with pytest.raises(OptionError, match="max_downsample"):
        build_config(AgentConfig, "agent", {"max_downsample": 3})
    with pytest.raises(ValueError, match="sy must be an integer >= 1"):
        AgentStep(2, 0, 0.4, 0.5)
    with pytest.raises(ValueError, match="set dit=True"):
        check_family("flux")
    check_family("unet")
    check_family("flux", dit=True)
    cfg = build_config(AgentConfig, "agent", {"dit": True, "dit_agent_grid": 8})
    check_family("wan", dit=cfg.dit)
    with pytest.raises(OptionError, match="dit_agent_grid"):
        build_config(AgentConfig, "agent", {"dit_agent_grid": 0})


# ---- generic DiT variant ----------------------------------------------------------------------------------
def naive_pooled(q, k, v, grid, agent_grid, text_len, scale, power, shortcut):
    """Text first. Agents: mean of the visual queries in each adaptive-pooling cell."""
    B, H, S, D = q.shape
    f, h, w = grid
    out = torch.empty_like(q)

    def cells(n, a):
        return [range((i * n) // a, -(-((i + 1) * n) // a)) for i in range(a)]

    for b in range(B):
        for hd in range(H):
            qv = q[b, hd, text_len:].view(f, h, w, D)
            agents, counts = [], []
            for cf in cells(f, agent_grid[0]):
                for ch in cells(h, agent_grid[1]):
                    for cw in cells(w, agent_grid[2]):
                        toks = [qv[i, j, l] for i in cf for j in ch for l in cw]
                        agents.append(torch.stack(toks).mean(0))
                        counts.append(len(toks))
            A = torch.stack(agents)
            kt, vt = k[b, hd, :text_len], v[b, hd, :text_len]
            kv, vv = k[b, hd, text_len:], v[b, hd, text_len:]
            va = naive_softmax_rows(A @ kv.T * scale) @ vv
            logits = torch.cat([q[b, hd, text_len:] @ A.T * scale ** power + torch.tensor(counts).log(),
                                q[b, hd, text_len:] @ kt.T * scale], dim=1)
            out[b, hd, text_len:] = naive_softmax_rows(logits) @ torch.cat([va, vt]) + shortcut * vv
            out[b, hd, :text_len] = naive_softmax_rows(q[b, hd, :text_len] @ k[b, hd].T * scale) @ v[b, hd]
    return out


@pytest.mark.parametrize("grid,agent_grid,text_len", [((1, 6, 6), (1, 3, 3), 5), ((2, 5, 7), (1, 2, 3), 4),
                                                      ((1, 4, 4), (1, 4, 4), 0)])
def test_pooled_agent_attention_matches_naive(grid, agent_grid, text_len):
    g = torch.Generator().manual_seed(1)
    S = math.prod(grid) + text_len
    q, k, v = (torch.randn(2, 2, S, 8, generator=g) for _ in range(3))
    ours = pooled_agent_attention(q, k, v, grid, agent_grid=agent_grid, text_len=text_len, agent_power=0.5,
                                  shortcut=0.1)
    want = naive_pooled(q, k, v, grid, agent_grid, text_len, 8 ** -0.5, 0.5, 0.1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    # text after the visual tokens: the same result with the pieces moved
    perm = list(range(text_len, S)) + list(range(text_len))
    after = pooled_agent_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], grid, agent_grid=agent_grid,
                                   text_len=text_len, text_position="after", agent_power=0.5, shortcut=0.1)
    torch.testing.assert_close(after, want[:, :, perm], rtol=1e-5, atol=1e-6)


def test_pooled_agent_attention_bad_input():
    q = torch.randn(1, 1, 20, 4)
    with pytest.raises(ValueError, match="sequence length 20 != visual 1x4x4 \\+ text 0"):
        pooled_agent_attention(q, q, q, (1, 4, 4))
    with pytest.raises(ValueError, match="agent_grid"):
        pooled_agent_attention(q, q, q, (1, 4, 4), text_len=4, agent_grid=(1, 8, 8))
