"""Independent parity check of VMoBA against the reference code itself (not part of the test suite: it needs a
checkout of KwaiVGI/VMoBA; the tests compare against our own loop-by-loop reading instead).

The reference (``src/vmoba.py``) runs its attention through flash-attn's CUDA varlen kernels. Here a small CPU
stand-in for the three flash-attn entry points it imports (varlen softmax attention returning the output and the
log-sum-exp, in fp32) is put in ``sys.modules`` before the reference module is loaded; everything else, the
partition rearrangement (``process_moba_input``/``process_moba_output``), the chunk gate, the top-k and the four
threshold rules, the self-chunk handling and the LSE merge, is the reference's own code. Its output is compared
with ``vmoba_visual_attention`` on the same q, k, v (batch 1, as the reference is run; grids divisible by the
chunk, which the reference requires), for 1D, 2D and 3D chunks and every selection mode.

    git -C VMoBA archive HEAD src | tar -x -C /tmp/vmoba-ref
    python benchmarks/vmoba_reference_check.py --ref /tmp/vmoba-ref/src   # -> results/vmoba-reference-parity.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch

from attnproc.kernels import dense_attention
from attnproc.layout import TokenLayout
from attnproc.sparse.vmoba import VMoBAConfig, vmoba_visual_attention

RESULTS = Path(__file__).resolve().parent / "results"
GRID = (6, 8, 8)
CHUNKS = {0: 1, 1: (4, 4), 2: (3, 4, 4)}  # layer kind -> reference chunk_size: 6 frames, 4 tiles, 8 cubes
MODES = [("topk", "query_head"), ("topk", "head_global"), ("topk", "overall"), ("threshold", "query_head"),
         ("threshold", "head_global"), ("threshold", "block"), ("threshold", "overall")]


def _varlen(q, k, v, cu_q, cu_k, scale):
    """Softmax attention per (cu_q[i]:cu_q[i+1], cu_k[i]:cu_k[i+1]) segment: out [Sq, H, D], lse [H, Sq]."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for i in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if b == a:
            continue
        s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[c:d].float()) * scale
        lse[:, a:b] = torch.logsumexp(s, dim=-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v[c:d].float())
    return out, lse


def flash_attn_stub() -> types.ModuleType:
    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                dropout_p, **_):
        assert not causal and dropout_p == 0.0
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        return None, None, None, None, out.to(q.dtype), lse, None, None

    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, **_):
        return _varlen(q, k, v, cu_q, cu_k, q.shape[-1] ** -0.5)[0].to(q.dtype)

    def backward(*_, **__):
        raise NotImplementedError("the CPU stand-in checks the forward pass only")

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_varlen_func = varlen_func
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward, iface._flash_attn_varlen_backward = forward, backward
    iface._flash_attn_forward, iface.flash_attn_varlen_func = backward, varlen_func  # what other references import
    flash.flash_attn_interface = iface
    return flash


def load_reference(src: Path):
    flash = flash_attn_stub()
    sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"] = flash, flash.flash_attn_interface
    spec = importlib.util.spec_from_file_location("vmoba_reference", src / "vmoba.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_output(ref, q, k, v, grid, chunk, select, ttype, tau, topk):
    """The reference's pipeline on ``[1, H, S, D]`` inputs: rearrange, varlen MoBA, rearrange back."""
    parts = [ref.process_moba_input(t.transpose(1, 2), grid, chunk) for t in (q, k, v)]
    (qr, size), (kr, _), (vr, _) = parts
    S = qr.shape[1]
    flat = [t.reshape(S, t.shape[2], t.shape[3]) for t in (qr, kr, vr)]
    cu = torch.tensor([0, S], dtype=torch.int32)
    out = ref.moba_attn_varlen(*flat, cu, S, size, topk, select_mode=select, simsum_threshold=tau,
                               threshold_type=ttype)
    return ref.process_moba_output(out.reshape(1, S, *out.shape[1:]), grid, chunk).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, required=True, help="the reference's src/ folder (holds vmoba.py)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vmoba-reference-parity.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_reference(a.ref)
    rows, S = [], math.prod(GRID)
    for seed, (kind, chunk) in enumerate(CHUNKS.items()):
        for select, ttype in MODES:
            torch.manual_seed(seed)
            q, k, v = (torch.randn(1, 3, S, 16) for _ in range(3))
            tau, topk = 0.25, 2
            cfg = VMoBAConfig(dense_first_layers=0, select=select, threshold_type=ttype, tau=tau, topk=topk,
                              **{("chunk_1d", "chunk_2d", "chunk_3d")[kind]: chunk}).resolved("wan")
            ours = vmoba_visual_attention(q, k, v, None, None, None, config=cfg, layout=TokenLayout(*GRID),
                                          layer_index=kind)
            theirs = reference_output(ref, q, k, v, GRID, chunk, select, ttype, tau, topk)
            err = float((ours - theirs).abs().max())
            # how far the selection is from dense: a match far below this means the same chunks were chosen
            off = float((ours - dense_attention(q, k, v)).abs().max())
            rows.append(dict(grid=list(GRID), chunk=chunk, select=select, threshold_type=ttype, tau=tau, topk=topk,
                             max_abs_diff=err, max_abs_diff_from_dense=off))
            print(f"chunk {chunk!s:>10} {select:>9} {ttype:<11} max |ours - reference| {err:.2e}  "
                  f"(ours - dense: {off:.2f})", flush=True)
    worst = max(r["max_abs_diff"] for r in rows)
    a.out.write_text(json.dumps(dict(reference="KwaiVGI/VMoBA src/vmoba.py", dtype="float32", batch=1, heads=3,
                                     head_dim=16, worst_max_abs_diff=worst, rows=rows), indent=1))
    print(f"worst {worst:.2e}; wrote {a.out}")


if __name__ == "__main__":
    main()
