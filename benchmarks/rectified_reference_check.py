"""Independent parity check of ``rectified_attention`` (Wan rules) against the reference code itself (not part of the
test suite: it needs a checkout of BienLuky/Rectified-SpaAttn; the tests compare against our own loop-by-loop
reading instead).

The reference's Wan attention (``rectified_spaattn/rectified_wan21_attn.py``, ``block_sparse_attention_combined``)
does its pooling, critical-block selection (threshold, top-k, neighbours, first-frame square), GAPR and the final
combination in torch, and only the exact attention over the critical blocks in a CUDA Triton kernel. That one
kernel is replaced, on the loaded reference module, by a CPU stand-in (softmax over the keys of the selected
blocks, keys past the sequence length masked, fp32, as the kernel's one-hot mask semantics say); everything else is
the reference's own code. ``top_k`` is given to the reference as ``int((1 - drop_rate) * blocks)``, our reading of
how its scripts derive it from the drop rate.

    git -C Rectified-SpaAttn archive HEAD rectified_spaattn | tar -x -C /tmp/rect-ref
    python benchmarks/rectified_reference_check.py --ref /tmp/rect-ref  # -> results/rectified-reference-parity.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import torch

from attnproc.kernels import dense_attention
from attnproc.sparse.gilbert import gilbert_block_neighbors, gilbert_permutation
from attnproc.sparse.rectified import rectified_attention
from vmoba_reference_check import flash_attn_stub

RESULTS = Path(__file__).resolve().parent / "results"
# (grid, block size, drop rate, p_remain, first-frame square, neighbours)
CASES = [((4, 8, 8), 32, 0.75, 0.3, True, True), ((4, 8, 8), 32, 0.75, 0.3, False, False),
         ((4, 8, 8), 16, 0.9, 0.1, False, False), ((4, 8, 8), 16, 0.5, 0.6, True, True),
         ((3, 8, 12), 32, 0.75, 0.3, True, True), ((5, 6, 10), 32, 0.8, 0.2, False, True)]  # 288, 300: ragged


def block_sparse_stand_in(q, k, v, seqlens, block_mask, sm_scale, block_size_M=128, block_size_N=128):
    """CPU stand-in for the reference's one-hot block-sparse Triton kernel: ``[B, H, Sq, D]``; query block ``i``
    attends the keys of the blocks ``block_mask[..., i, :]`` sets, keys at or past ``seqlens[0]`` masked."""
    Sq, Sk = q.shape[2], k.shape[2]
    allowed = block_mask.repeat_interleave(block_size_M, dim=-2)[..., :Sq, :]
    allowed = allowed.repeat_interleave(block_size_N, dim=-1)[..., :Sk] & (torch.arange(Sk) < int(seqlens[0]))
    return dense_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=sm_scale).to(q.dtype)


def load_reference(root: Path, name: str):
    """``rectified_spaattn.<name>`` with the block-sparse kernel replaced on the loaded copy; flash-attn (the
    HunyuanVideo text queries) is the CPU stand-in of vmoba_reference_check.py."""
    sys.path.insert(0, str(root))
    importlib.import_module("diffusers.models.attention_processor")  # before the stand-in: diffusers probes flash_attn
    flash = flash_attn_stub()
    sys.modules.setdefault("flash_attn", flash)
    sys.modules.setdefault("flash_attn.flash_attn_interface", flash.flash_attn_interface)
    module = importlib.import_module(f"rectified_spaattn.{name}")
    module._triton_block_sparse_attention_onehot = block_sparse_stand_in  # the one CUDA kernel, on this copy only
    return module


def hunyuan_rows(ref) -> list[dict]:
    """The HunyuanVideo rules (IPAR): ``[visual | 256 text slots]`` (the reference fixes 256), the first
    ``text_valid`` real; compared on the visual rows and the valid text rows (padded slots are never attended)."""
    rows = []
    for seed, (grid, bs, drop, p_remain, valid) in enumerate([((4, 8, 8), 32, 0.8, 0.3, 40),
                                                              ((4, 8, 8), 32, 0.5, 0.6, 256),
                                                              ((2, 8, 16), 64, 0.8, 0.3, 7)]):
        torch.manual_seed(100 + seed)
        N, T = math.prod(grid), 256
        perm, _ = gilbert_permutation(grid)
        q, k, v = (torch.cat([torch.randn(1, 2, N, 32)[:, :, perm], torch.randn(1, 2, T, 32)], 2) * 2
                   for _ in range(3))
        table = gilbert_block_neighbors(grid, bs)
        ours = rectified_attention(q, k, v, block_size=bs, drop_rate=drop, p_remain=p_remain, neighbors=table,
                                   text_len=T, text_valid=valid, variant="hunyuan")
        S = N + T
        real = torch.arange(S) < N + valid
        cu = torch.tensor([0, N + valid, S], dtype=torch.int32)
        theirs = ref.rectified_block_sparse_attention(q.clone(), k.clone(), v.clone(), real.view(1, 1, 1, S),
                                                      int((1 - drop) * (N // bs)), bs, bs, cu_seqlens_q=cu,
                                                      cu_seqlens_kv=cu, max_seqlen_q=S, max_seqlen_kv=S,
                                                      block_neighbor_list=table, shape_xfuse=True,
                                                      p_remain_rates=p_remain).transpose(1, 2)
        err = float((ours - theirs)[:, :, real].abs().max())
        off = float((ours - dense_attention(q, k, v, attn_mask=real.view(1, 1, 1, -1)))[:, :, real].abs().max())
        rows.append(dict(variant="hunyuan", grid=list(grid), tokens=N, text_slots=T, text_valid=valid,
                         block_size=bs, drop_rate=drop, p_remain=p_remain, neighbors=True, max_abs_diff=err,
                         max_abs_diff_from_dense=off))
        print(f"hunyuan grid {grid} bs {bs} drop {drop} p {p_remain} text {valid}/{T}: max |ours - reference| "
              f"{err:.2e} (ours - dense {off:.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, required=True, help="folder holding the reference's rectified_spaattn/")
    ap.add_argument("--out", type=Path, default=RESULTS / "rectified-reference-parity.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_reference(a.ref, "rectified_wan21_attn")
    rows = []
    for seed, (grid, bs, drop, p_remain, first_frame, neighbours) in enumerate(CASES):
        torch.manual_seed(seed)
        N = math.prod(grid)
        perm, _ = gilbert_permutation(grid)
        q, k, v = (torch.randn(1, 2, N, 32)[:, :, perm] * 2 for _ in range(3))  # tokens in the reference's order
        nq = math.ceil(N / bs)
        ff = nq // grid[0] if first_frame else 0
        table = gilbert_block_neighbors(grid, bs) if neighbours else None
        ours, mask = rectified_attention(q, k, v, block_size=bs, drop_rate=drop, p_remain=p_remain,
                                         first_frame_blocks=ff, neighbors=table, return_block_mask=True)
        theirs = ref.rectified_block_sparse_attention(q, k, v, None, int((1 - drop) * nq), bs, bs,
                                                      block_neighbor_list=table, shape_xfuse=True,
                                                      p_remain_rates=p_remain, first_frame_blocks=ff)
        theirs = theirs.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]
        err = float((ours - theirs).abs().max())
        off = float((ours - dense_attention(q, k, v)).abs().max())
        rows.append(dict(variant="wan", grid=list(grid), tokens=N, block_size=bs, drop_rate=drop, p_remain=p_remain,
                         first_frame_blocks=ff, neighbors=neighbours, max_abs_diff=err, max_abs_diff_from_dense=off,
                         critical_density=round(float(mask.float().mean()), 4)))
        print(f"grid {grid} bs {bs} drop {drop} p {p_remain} ff {ff} nb {neighbours}: critical "
              f"{rows[-1]['critical_density']:.2f}, max |ours - reference| {err:.2e} (ours - dense {off:.2f})",
              flush=True)
    rows += hunyuan_rows(load_reference(a.ref, "rectified_hunyuan_attn"))
    worst = max(r["max_abs_diff"] for r in rows)
    a.out.write_text(json.dumps(dict(reference="BienLuky/Rectified-SpaAttn rectified_wan21_attn.py and "
                                               "rectified_hunyuan_attn.py", dtype="float32",
                                     kernel="CPU stand-in for the one-hot block-sparse Triton kernel",
                                     worst_max_abs_diff=worst, rows=rows), indent=1))
    print(f"worst {worst:.2e}; wrote {a.out}")


if __name__ == "__main__":
    main()
