"""Triton block-sparse forward kernel under TRITON_INTERPRET=1 on CPU (fp32 and fp16, small sizes).

The interpreter flag must be set before triton decorates the kernel, so the checks run in a subprocess.
bf16 is not checked: the interpreter computes bf16 wrongly. Backward is not implemented (forward-only kernel).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, torch
from attnproc.kernels import block_sparse_attention, num_blocks
from kernel_oracle import random_block_mask, reference_attention

cases = [
    # seed, B, H, Sq, Sk, D, Dv, bq, bk, per_head, Se, dtype
    (0, 1, 2, 64, 64, 16, 16, 16, 16, False, 0, "float32"),
    (1, 2, 2, 50, 37, 16, 32, 16, 32, True, 5, "float32"),   # ragged, Sq != Sk, Dv != D, extra keys
    (2, 1, 3, 40, 72, 24, 16, 32, 16, True, 19, "float32"),  # D not a power of two, extra tail tile
    (3, 1, 2, 64, 48, 16, 16, 16, 16, True, 7, "float16"),
    (4, 2, 1, 33, 33, 32, 32, 16, 16, False, 0, "float16"),
]
res = []
for seed, B, H, Sq, Sk, D, Dv, bq, bk, per_head, Se, dt in cases:
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q, k, v = mk(B, H, Sq, D), mk(B, H, Sk, D), mk(B, H, Sk, Dv)
    ek, ev = (mk(B, H, Se, D), mk(B, H, Se, Dv)) if Se else (None, None)
    shape = (B if per_head else 1, H if per_head else 1, num_blocks(Sq, bq), num_blocks(Sk, bk))
    bm = random_block_mask(g, shape, 0.4, nonempty=not Se)
    out, lse = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev, return_lse=True,
                                      backend="triton")
    ref, ref_lse = reference_attention(q, k, v, bm, bq, bk, ek, ev)
    res.append({"case": seed, "dtype": dt, "out_err": (out.double() - ref).abs().max().item(),
                "lse_err": (lse.double() - ref_lse).abs().max().item(), "nan": bool(torch.isnan(out).any()),
                "shape_ok": tuple(out.shape) == tuple(ref.shape) and out.dtype == dtype})
print("RESULT" + json.dumps(res))
"""


def test_triton_forward_under_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(here) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=here, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    results = json.loads(line[len("RESULT"):])
    assert len(results) == 5
    for r in results:
        tol = 1e-5 if r["dtype"] == "float32" else 2e-2
        assert r["shape_ok"] and not r["nan"], r
        assert r["out_err"] <= tol, r
        assert r["lse_err"] <= tol, r


def test_triton_refuses_cpu_without_interpreter():
    import torch

    from attnproc.kernels import block_sparse_attention

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter enabled in this process")
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="needs CUDA"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, backend="triton")
