"""Fidelity of agent attention against dense attention (relative L2 error), on random inputs with spatial structure.

1. AgentSD's attn1 at the SD 1.5 512^2 full-resolution shape (64x64 tokens, 320 channels, 8 heads, batch 2),
   random weights, block input = a smooth random field plus noise: AgentSD early steps (merge 0.4 + agents),
   plain ToMe with the same windows and merge ratio (agents off), ToMe with the late-step windows, all vs the
   stock dense attention. Default random weights make the attention near-uniform (logit std ~0.3); a to_q/to_k
   gain of 2 makes the logits 4x larger. Trained SD layers differ: these numbers test the approximation, not SD.
2. The generic DiT variant (:func:`pooled_agent_attention`): a Flux-like joint sequence (64 text tokens + a 32x32
   visual grid, 4 heads of 64) with queries/keys that are smooth functions of position (``local_qkv`` of
   sparse_fidelity.py; ``sharp`` 3 = local attention like video/image DiTs, 1 = diffuse), values smooth or
   random. Against the natural same-cost baseline: attention to the keys/values average-pooled to the same
   number of tokens (with the log-count bias), text keys exact.

    nice -n 10 python benchmarks/agent_fidelity.py        # -> benchmarks/results/agent-fidelity.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from sparse_fidelity import local_qkv, rel_l2

from attnproc.kernels import dense_attention
from attnproc.sparse.agent import AgentStep, _pool_counts, agent_self_attention, pooled_agent_attention

RESULTS = Path(__file__).resolve().parent / "results"


def smooth_tokens(batch, h, w, channels, seed, cells=8, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, channels, cells, cells, generator=g)
    field = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (field + noise * torch.randn(batch, channels, h, w, generator=g)).flatten(2).transpose(1, 2)


def unet_rows(gain):
    """``gain`` scales to_q and to_k, so the logits scale by gain^2 (1: near-uniform attention)."""
    torch.manual_seed(0)
    B, h, w, C, heads = 2, 64, 64, 320, 8
    attn = Attention(C, heads=heads, dim_head=C // heads, bias=False).eval()
    with torch.no_grad():
        attn.to_q.weight.mul_(gain)
        attn.to_k.weight.mul_(gain)
    x = smooth_tokens(B, h, w, C, 1)
    hidden = F.layer_norm(x, (C,))
    variants = {
        "agentsd early (sx=sy=4, ratio 0.4, agent_ratio 0.95: 256 agents)": AgentStep(4, 4, 0.4, 0.95),
        "plain ToMe, same windows and ratio (sx=sy=4, ratio 0.4, agents off)": AgentStep(4, 4, 0.4, 0.0),
        "agentsd late = plain ToMe (sx=sy=2, ratio 0.4)": AgentStep(2, 2, 0.4, 0.5),
        "agentsd early windows, no token merge for attention (ratio 0.01)": AgentStep(4, 4, 0.01, 0.95),
    }
    rows = []
    with torch.no_grad():
        dense = attn(hidden)
        for name, step in variants.items():
            out = agent_self_attention(attn, hidden, x, (h, w), step, generator=torch.Generator().manual_seed(0))
            rows.append(dict(qk_gain=gain, variant=name, rel_l2_vs_dense=round(rel_l2(out, dense), 4)))
            print(f"[unet gain {gain}] {name}: rel L2 {rows[-1]['rel_l2_vs_dense']}", flush=True)
    return rows


def pooled_kv_attention(q, k, v, grid, agent_grid, text_len):
    """Same-cost baseline: visual queries attend to mean-pooled visual keys/values (log-count bias) and the text
    keys; text queries dense. Text first."""
    B, H, S, D = q.shape
    f, h, w = grid

    def pool(t):
        cells = t[:, :, text_len:].reshape(B * H, f, h, w, D).permute(0, 4, 1, 2, 3)
        return F.adaptive_avg_pool3d(cells, agent_grid).flatten(2).transpose(1, 2).view(B, H, -1, D)

    kp, vp = pool(k), pool(v)
    bias = _pool_counts(grid, agent_grid, q.device).flatten().log()
    mask = torch.cat([bias, torch.zeros(text_len)]).view(1, 1, 1, -1)
    keys = torch.cat([kp, k[:, :, :text_len]], 2)
    vals = torch.cat([vp, v[:, :, :text_len]], 2)
    out_vis = dense_attention(q[:, :, text_len:], keys, vals, attn_mask=mask)
    return torch.cat([dense_attention(q[:, :, :text_len], k, v), out_vis], 2)


def dit_rows():
    grid, text_len, heads, dim = (1, 32, 32), 64, 4, 64
    rows = []
    for sharp in (3.0, 1.0):
        for values in ("random", "smooth"):
            q, k, v = local_qkv(grid, heads=heads, dim=dim, sharp=sharp, seed=0)
            if values == "smooth":
                v = local_qkv(grid, heads=heads, dim=dim, sharp=1.0, seed=1)[0]
            g = torch.Generator().manual_seed(2)
            text = [sharp * torch.randn(1, heads, text_len, dim, generator=g) / 4 for _ in range(2)]
            text.append(torch.randn(1, heads, text_len, dim, generator=g))
            q, k, v = (torch.cat([t, x], 2) for t, x in zip(text, (q, k, v)))
            dense = dense_attention(q, k, v)
            vis = slice(text_len, None)

            def score(out):
                return round(rel_l2(out[:, :, vis], dense[:, :, vis]), 4)

            for ag in ((1, 8, 8), (1, 16, 16)):
                n = ag[1] * ag[2]
                row = dict(sharp=sharp, values=values, agents=n,
                           pooled_kv_baseline=score(pooled_kv_attention(q, k, v, grid, ag, text_len)))
                for power, shortcut in ((1.0, 0.0), (0.3, 0.0), (0.3, 0.075), (1.0, 0.075)):
                    out = pooled_agent_attention(q, k, v, grid, agent_grid=ag, text_len=text_len,
                                                 agent_power=power, shortcut=shortcut)
                    row[f"agent p={power} shortcut={shortcut}"] = score(out)
                rows.append(row)
                print(f"[dit] {row}", flush=True)
    return rows


def main():
    result = dict(unet_attn1_sd15_shape=unet_rows(1.0) + unet_rows(2.0), dit_generic=dit_rows(),
                  note="relative L2 of the visual-token outputs vs dense; random inputs/weights, see docstring")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "agent-fidelity.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
