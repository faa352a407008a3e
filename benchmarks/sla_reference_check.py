"""Independent parity check of ``sla_attention`` against the reference code itself (not part of the test suite:
it needs a checkout of thu-ml/SLA, and runs its Triton kernels on CPU through ``TRITON_INTERPRET=1``).

The reference module computes in bf16/fp16; for this check its compute dtype is set to fp32, proj_l gets random
weights, and forward plus backward (dq, dk, dv, d proj) are compared with ours at blocks 64x64, D=32.

    git -C SLA archive main sparse_linear_attention | tar -x -C /tmp/sla-main
    git -C SLA archive SLA-1 sparse_linear_attention | tar -x -C /tmp/sla-1
    TRITON_INTERPRET=1 python benchmarks/sla_reference_check.py --main /tmp/sla-main --sla1 /tmp/sla-1
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from attnproc.sparse.sla import sla_attention

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(256, 0.5, "softmax", 0), (200, 0.25, "elu", 1), (320, 0.4, "relu", 2), (256, 1.0, "softmax", 3)]


def check(variant: str, root: str) -> list[dict]:
    sys.path.insert(0, root)
    for name in [n for n in sys.modules if n.startswith("sparse_linear_attention")]:
        del sys.modules[name]
    ref_mod = importlib.import_module("sparse_linear_attention.core")
    sys.path.remove(root)
    rows = []
    for L, topk, fm, seed in CASES:
        torch.manual_seed(seed)
        B, H, D = 1, 2, 32
        q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        m = ref_mod.SparseLinearAttention(D, topk, feature_map=fm, BLKQ=64, BLKK=64)
        m.dtype = torch.float32  # the reference's compute dtype, fp32 for this check
        with torch.no_grad():
            m.proj_l.weight.normal_(0, 0.3)
            m.proj_l.bias.normal_(0, 0.1)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = m(*ins)
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, ins + [m.proj_l.weight, m.proj_l.bias], g)
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        W = m.proj_l.weight.detach().clone().requires_grad_()
        b = m.proj_l.bias.detach().clone().requires_grad_()
        out = sla_attention(*ours, W, b, block_q=64, block_k=64, topk=topk, variant=variant, feature_map=fm)
        grads = torch.autograd.grad(out, ours + [W, b], g)
        row = dict(variant=variant, L=L, topk=topk, feature_map=fm,
                   out_max_abs_err=float((out - ref).abs().max()), out_max_abs=float(ref.detach().abs().max()))
        for n, a, r in zip(["dq", "dk", "dv", "dproj_weight", "dproj_bias"], grads, ref_grads):
            row[f"{n}_max_abs_err"] = float((a - r).abs().max())
            row[f"{n}_max_abs"] = float(r.abs().max())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--main", required=True, help="folder holding sparse_linear_attention/ of branch main")
    ap.add_argument("--sla1", required=True, help="folder holding sparse_linear_attention/ of branch SLA-1")
    args = ap.parse_args()
    rows = check("main", args.main) + check("sla1", args.sla1)
    meta = dict(reference="thu-ml/SLA main d973e55ea5b5, SLA-1 325cc7519f79", dtype="float32",
                how="reference Triton kernels under TRITON_INTERPRET=1 on CPU; reference compute dtype set to fp32",
                B=1, H=2, D=32, blocks=[64, 64], torch=torch.__version__)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sla-reference-parity.json"
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
