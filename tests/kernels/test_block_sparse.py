"""block_sparse_attention (gather, dense, auto) against the float64 definition; errors; backend selection."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnproc.kernels import (
    AUTO_FLEX_MIN_PAIRS,
    BackendFallbackWarning,
    block_sparse_attention,
    num_blocks,
    select_backend,
)

from kernel_oracle import random_block_mask, reference_attention

PROPS = settings(max_examples=30, deadline=None)


def _case(seed, B, H, Sq, Sk, D, Dv, bq, bk, per_head, Se, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).requires_grad_(requires_grad)
    q, k, v = mk(B, H, Sq, D), mk(B, H, Sk, D), mk(B, H, Sk, Dv)
    ek = ev = None
    if Se:
        ek, ev = mk(B, H, Se, D), mk(B, H, Se, Dv)
    mh = H if per_head else 1
    mb = B if per_head else 1
    # with extra keys a row may be empty: it then attends the extra keys only
    bm = random_block_mask(gen, (mb, mh, num_blocks(Sq, bq), num_blocks(Sk, bk)), nonempty=not Se)
    return q, k, v, ek, ev, bm


shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 2),  # B
    st.sampled_from([1, 3]),  # H
    st.integers(1, 70),  # Sq
    st.integers(1, 70),  # Sk
    st.sampled_from([8, 16]),  # D
    st.sampled_from([8, 12]),  # Dv
    st.sampled_from([4, 8, 16, 32]),  # bq
    st.sampled_from([4, 8, 16, 32]),  # bk
    st.booleans(),  # per-head mask
    st.sampled_from([0, 0, 3, 9]),  # Se
)


@PROPS
@given(shapes)
def test_fp32_matches_definition(case):
    q, k, v, ek, ev, bm = _case(*case)
    bq, bk = case[7], case[8]
    ref, ref_lse = reference_attention(q, k, v, bm, bq, bk, ek, ev)
    for backend in ("gather", "dense"):
        out = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev, backend=backend)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert (out.double() - ref).abs().max() <= 1e-5, backend
        out2, lse = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev, return_lse=True,
                                           backend=backend)
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        assert (out2.double() - ref).abs().max() <= 1e-5, backend
        assert (lse.double() - ref_lse).abs().max() <= 1e-5, backend
    auto = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev)  # tiny -> gather on CPU
    assert (auto.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["gather", "dense"])
@pytest.mark.parametrize("Se", [0, 5])
def test_half_precision(dtype, backend, Se):
    q, k, v, ek, ev, bm = _case(3, 2, 2, 67, 45, 16, 16, 16, 8, True, Se, dtype=dtype)
    ref, ref_lse = reference_attention(q, k, v, bm, 16, 8, ek, ev)  # of the rounded inputs
    out = block_sparse_attention(q, k, v, bm, (16, 8), extra_k=ek, extra_v=ev, backend=backend)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= 2e-2
    out, lse = block_sparse_attention(q, k, v, bm, (16, 8), extra_k=ek, extra_v=ev, backend=backend,
                                      return_lse=True)
    assert (out.double() - ref).abs().max() <= 2e-2
    assert (lse.double() - ref_lse).abs().max() <= 2e-2


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    fn().backward()
    # a tensor no kept block reads (e.g. k when every row attends only extra keys) gets no gradient: zero
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]


@settings(max_examples=12, deadline=None)
@given(shapes, st.booleans())
def test_backward_matches_dense_autograd(case, with_lse):
    q, k, v, ek, ev, bm = _case(*case, requires_grad=True)
    bq, bk = case[7], case[8]
    leaves = [t for t in (q, k, v, ek, ev) if t is not None]
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], generator=gen, dtype=torch.float64)
    wl = torch.randn(q.shape[:3], generator=gen, dtype=torch.float64)

    def loss_ref():
        o, l = reference_attention(q, k, v, bm, bq, bk, ek, ev)
        return (o * w).sum() + ((l * wl).sum() if with_lse else 0)

    def loss(backend):
        def f():
            if with_lse:
                o, l = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev, return_lse=True,
                                              backend=backend)
                return (o.double() * w).sum() + (l.double() * wl).sum()
            o = block_sparse_attention(q, k, v, bm, (bq, bk), extra_k=ek, extra_v=ev, backend=backend)
            return (o.double() * w).sum()
        return f

    ref = _grads(loss_ref, leaves)
    for backend in ("gather", "dense"):
        got = _grads(loss(backend), leaves)
        for name, g, r in zip("q k v ek ev".split(), got, ref):
            assert (g.double() - r).abs().max() <= 1e-5, (backend, name)


def test_half_precision_backward_gather():
    q, k, v, ek, ev, bm = _case(5, 1, 2, 40, 33, 16, 16, 16, 16, True, 4, dtype=torch.bfloat16, requires_grad=True)
    leaves = [q, k, v, ek, ev]
    ref = _grads(lambda: reference_attention(q, k, v, bm, 16, 16, ek, ev)[0].sum(), leaves)
    got = _grads(lambda: block_sparse_attention(q, k, v, bm, 16, extra_k=ek, extra_v=ev,
                                                backend="gather").float().sum(), leaves)
    for g, r in zip(got, ref):
        assert (g.double() - r).abs().max() <= 5e-2


# ----------------------------------------------------------------------------------------------- errors


def _ok_inputs():
    q = torch.randn(1, 2, 20, 8)
    k = torch.randn(1, 2, 12, 8)
    v = torch.randn(1, 2, 12, 8)
    bm = torch.ones(1, 2, 3, 2, dtype=torch.bool)  # ceil(20/8)=3, ceil(12/8)=2
    return q, k, v, bm


def test_empty_rows_are_refused_with_their_position():
    q, k, v, bm = _ok_inputs()
    bm[0, 1, 2] = False
    bm[0, 0, 0] = False
    with pytest.raises(ValueError, match=r"2 query-block row\(s\) with no key block.*\(0, 0, 0\), \(0, 1, 2\)"):
        block_sparse_attention(q, k, v, bm, 8, backend="gather")
    # extra keys make every row non-empty: no error, no NaN, equal to the definition
    ek, ev = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    for backend in ("gather", "dense"):
        out = block_sparse_attention(q, k, v, bm, 8, extra_k=ek, extra_v=ev, backend=backend)
        assert not torch.isnan(out).any()
        ref, _ = reference_attention(q, k, v, bm, 8, 8, ek, ev)
        assert (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: a.update(bm=torch.ones(1, 2, 3, 3, dtype=torch.bool)), ValueError, r"ceil\(12/8\)=2.*got \(1, 2, 3, 3\)"),
        (lambda a: a.update(bm=torch.ones(1, 3, 3, 2, dtype=torch.bool)), ValueError, "block_mask must be"),
        (lambda a: a.update(bm=torch.ones(1, 2, 3, 2)), TypeError, "bool"),
        (lambda a: a.update(k=torch.randn(1, 2, 12, 4)), ValueError, "k head dim must equal q's"),
        (lambda a: a.update(v=torch.randn(1, 2, 11, 8)), ValueError, "v must have k's length"),
        (lambda a: a.update(q=torch.randn(2, 20, 8)), ValueError, r"q must be \[B, H, S, D\]"),
        (lambda a: a.update(q=torch.randn(1, 2, 20, 8, dtype=torch.float64)), TypeError, "q dtype"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "share a dtype"),
        (lambda a: a.update(extra_k=torch.randn(1, 2, 3, 8)), ValueError, "together"),
        (lambda a: a.update(extra_k=torch.randn(1, 2, 3, 8), extra_v=torch.randn(1, 2, 4, 8)), ValueError, "extra_v must be"),
        (lambda a: a.update(extra_k=torch.randn(1, 2, 3, 5), extra_v=torch.randn(1, 2, 3, 8)), ValueError, "extra_k must be"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "backend must be one of"),
    ],
)
def test_clear_errors(mutate, exc, pattern):
    q, k, v, bm = _ok_inputs()
    args = dict(q=q, k=k, v=v, bm=bm)
    mutate(args)
    bm = args.pop("bm")
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=pattern):
        block_sparse_attention(q, k, v, bm, 8, **args)


# ------------------------------------------------------------------------------------- backend selection


def test_select_backend_rules():
    big = AUTO_FLEX_MIN_PAIRS
    assert select_backend("auto", "cpu", pairs=10)[0] == "gather"
    assert select_backend("auto", "cpu", pairs=big, needs_grad=True)[0] == "gather"
    assert select_backend("auto", "cpu", pairs=big, return_lse=True)[0] == "gather"
    assert select_backend("auto", "cpu", pairs=big, block_size=48)[0] == "gather"
    assert select_backend("gather", "cpu") == ("gather", "requested")
    assert select_backend("dense", "cpu") == ("dense", "requested")
    name, reason = select_backend("flex", "cpu", needs_grad=True)
    assert name == "gather" and "backward" in reason
    name, reason = select_backend("auto", "cuda", needs_grad=True)
    assert name == "flex"
    assert select_backend("auto", "meta")[0] == "gather"


def test_auto_small_cpu_call_does_not_compile(monkeypatch):
    from attnproc.kernels import _flex

    def boom(*a, **k):
        raise AssertionError("flex must not run for a tiny auto call")

    monkeypatch.setattr(_flex, "flex_attention_blocks", boom)
    q, k, v, bm = _ok_inputs()
    block_sparse_attention(q, k, v, bm, 8)


def test_xformers_backend_guard():
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        q, k, v, bm = _ok_inputs()
        with pytest.raises(ImportError, match="xformers"):
            block_sparse_attention(q, k, v, bm, 8, backend="xformers")
        pytest.skip("xformers not installed: checked the import guard only")
    if not torch.cuda.is_available():
        pytest.skip("xformers parity runs on CUDA only")
    q, k, v, ek, ev, bm = _case(0, 1, 2, 100, 90, 64, 64, 32, 32, True, 7, dtype=torch.float16)
    q, k, v, ek, ev, bm = (t.cuda() for t in (q, k, v, ek, ev, bm))
    out = block_sparse_attention(q, k, v, bm, 32, extra_k=ek, extra_v=ev, backend="xformers")
    ref, _ = reference_attention(q.cpu(), k.cpu(), v.cpu(), bm.cpu(), 32, 32, ek.cpu(), ev.cpu())
    assert (out.cpu().double() - ref).abs().max() <= 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gather_inference_lse_uses_cpu_flash_kernel(monkeypatch, dtype, tol):
    # without a gradient (and D == Dv) gather takes the LSE from ATen's CPU flash kernel, not fp32 math
    from attnproc.kernels import _gather

    def no_math(*a, **k):
        raise AssertionError("math path used")

    monkeypatch.setattr(_gather, "_math_attention", no_math)
    q, k, v, ek, ev, bm = _case(7, 2, 3, 75, 53, 16, 16, 16, 16, True, 6, dtype=dtype)
    bm[..., -1] = True  # every row reads the ragged tail block
    bm[0, 0, 0] = False
    out, lse = block_sparse_attention(q, k, v, bm, 16, extra_k=ek, extra_v=ev, return_lse=True, backend="gather")
    ref, ref_lse = reference_attention(q, k, v, bm, 16, 16, ek, ev)
    assert (out.double() - ref).abs().max() <= tol
    assert (lse.double() - ref_lse).abs().max() <= tol


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("Se,dtype,tol", [(0, torch.float32, 1e-5), (5, torch.float32, 1e-5), (5, torch.bfloat16, 2e-2)])
def test_gather_split_rows_merge_exactly(monkeypatch, return_lse, Se, dtype, tol):
    # with a tiny chunk budget every row's key blocks are processed in pieces merged by LSE (inference path)
    from attnproc.kernels import _gather

    monkeypatch.setattr(_gather, "CHUNK_BYTES", 1)
    q, k, v, ek, ev, bm = _case(11, 2, 2, 70, 61, 16, 16, 8, 8, True, Se, dtype=dtype)
    bm[..., -1] = True  # rows include the ragged tail block
    bm |= torch.rand(bm.shape, generator=torch.Generator().manual_seed(0)) < 0.6  # long rows
    ref, ref_lse = reference_attention(q, k, v, bm, 8, 8, ek, ev)
    res = block_sparse_attention(q, k, v, bm, 8, extra_k=ek, extra_v=ev, return_lse=return_lse, backend="gather")
    out = res[0] if return_lse else res
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= tol
    if return_lse:
        assert (res[1].double() - ref_lse).abs().max() <= tol
