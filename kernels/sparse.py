"""``block_sparse_attention``: one entry point, backends behind it (flex, triton, gather, dense, xformers)."""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _flex
from ._gather import gather_attention
from .autotune import BACKEND_ENV, BackendTuner, default_tuner, forced_backend, tune_key
from .blockmask import block_to_token_mask, normalize_block_size, num_blocks
from .record import recorded_run

__all__ = ["block_sparse_attention", "select_backend", "BACKENDS", "BACKEND_TABLE", "Backend", "AUTO_FLEX_MIN_PAIRS", "BackendFallbackWarning"]

BACKENDS = ("auto", "flex", "triton", "gather", "dense", "xformers")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ``auto`` on CPU uses flex only when B*H*Sq*(Sk+Se) reaches this many query-key pairs (a 4096x4096
# attention with 4 heads); below it a first compile (1.5-9 s) costs more than it can save, so gather runs.
AUTO_FLEX_MIN_PAIRS = 1 << 26

_flex_failed: dict[str, str] = {}  # memo: device type -> why compiling flex failed there (auto stops trying)


class BackendFallbackWarning(UserWarning):
    """An explicitly requested backend could not serve a call and another backend ran instead."""


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _xformers_importable() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class _Call:
    """What a backend needs to know to say whether it can serve a call."""

    needs_grad: bool
    return_lse: bool
    bq: int
    bk: int
    pairs: int | None


def _flex_unavailable(dev: str, call: _Call) -> str | None:
    why = _flex.supports(dev, needs_grad=call.needs_grad, return_lse=call.return_lse, bq=call.bq, bk=call.bk)
    if why is None and dev in _flex_failed:
        why = f"compiling flex failed earlier on {dev}: {_flex_failed[dev]}"
    return why


def _triton_missing(dev: str) -> Exception | None:
    if dev != "cuda" and not (dev == "cpu" and _triton_interpret()):
        return ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got device type {dev!r}")
    if not _triton_importable():
        return ImportError("backend='triton' needs the triton package (pip install triton)")
    return None


def _triton_unavailable(dev: str, call: _Call) -> str | None:
    return "triton kernel is forward-only and a gradient is needed" if call.needs_grad else None


def _xformers_missing(dev: str) -> Exception | None:
    return None if _xformers_importable() else ImportError(
        "backend='xformers' needs the xformers package, which is not installed")


def _always(*args) -> None:
    return None


def _run_triton(*args, needs_grad):
    from . import _triton

    return _triton.triton_block_sparse(*args)


@dataclass(frozen=True)
class Backend:
    """One kernel behind :func:`block_sparse_attention`: ``missing(device_type)`` is the error an explicit request
    raises when the device or a package rules it out (``None``: usable); ``unavailable(device_type, call)`` says
    why it cannot serve one call (``None``: it can), and an explicit request then goes to the first of
    ``fallback`` that can; ``run(q, k, v, block_mask, bq, bk, scale, extra_k, extra_v, return_lse, *,
    needs_grad)`` returns ``(out, lse or None)``."""

    name: str
    unavailable: Callable[[str, _Call], str | None]
    run: Callable[..., tuple]
    fallback: tuple[str, ...] = ()
    missing: Callable[[str], Exception | None] = _always


# The backends in order of preference; "auto" takes the first of _AUTO_ORDER[device type] that can serve a call.
BACKEND_TABLE: dict[str, Backend] = {b.name: b for b in [
    Backend("triton", _triton_unavailable, _run_triton, fallback=("flex", "gather"), missing=_triton_missing),
    Backend("flex", _flex_unavailable, lambda *a, needs_grad: _flex.flex_attention_blocks(*a, needs_grad=needs_grad),
            fallback=("gather",)),
    Backend("gather", _always, lambda *a, needs_grad: gather_attention(*a, needs_grad=needs_grad)),
    Backend("dense", _always, lambda *a, needs_grad: dense_block_sparse(*a)),
    Backend("xformers", _always, lambda *a, needs_grad: _xformers_block_sparse(*a), missing=_xformers_missing),
]}
_AUTO_ORDER = {"cuda": ("triton", "flex", "gather"), "cpu": ("flex", "gather")}


def _auto_candidates(device_type: str, call: _Call, *, small_rule: bool = True) -> tuple[list[str], list[str]]:
    """The backends of the device's order that can serve ``call`` (never empty: gather serves every call), and
    why the others cannot. ``small_rule``: skip flex on CPU below ``AUTO_FLEX_MIN_PAIRS`` pairs."""
    usable, skipped = [], []
    for name in _AUTO_ORDER.get(device_type, ("gather",)):
        missing = BACKEND_TABLE[name].missing(device_type)
        why = str(missing) if missing is not None else BACKEND_TABLE[name].unavailable(device_type, call)
        if why is None and small_rule and name == "flex" and device_type == "cpu" and call.pairs is not None \
                and call.pairs < AUTO_FLEX_MIN_PAIRS:
            why = f"small problem ({call.pairs} < {AUTO_FLEX_MIN_PAIRS} pairs), compile not worth it"
        (skipped.append(f"{name}: {why}") if why else usable.append(name))
    return usable or ["gather"], skipped


def select_backend(
    backend: str,
    device_type: str,
    *,
    needs_grad: bool = False,
    return_lse: bool = False,
    block_size: int | Sequence[int] = 128,
    pairs: int | None = None,
) -> tuple[str, str]:
    """Resolve ``backend`` for a call; returns ``(name, reason)``.

    ``pairs`` is ``B*H*Sq*(Sk+Se)`` (``None``: large). ``"auto"`` takes the first backend that can serve the
    call from :data:`BACKEND_TABLE` in the device's order: CUDA ``triton`` (forward only), ``flex``, ``gather``;
    CPU ``flex`` (compiled: no gradient, no LSE, a C++ compiler, power-of-two blocks, no earlier compile
    failure, and at least ``AUTO_FLEX_MIN_PAIRS`` query-key pairs), ``gather``; other devices ``gather``.

    An explicit ``"flex"`` that cannot serve the call resolves to ``gather`` and an explicit ``"triton"``
    that needs a gradient resolves to ``flex`` (or ``gather``); the caller warns with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    bq, bk = normalize_block_size(block_size)
    call = _Call(needs_grad, return_lse, bq, bk, pairs)
    if backend == "auto":
        usable, skipped = _auto_candidates(device_type, call)
        return usable[0], f"auto on {device_type}" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
    chosen = BACKEND_TABLE[backend]
    missing = chosen.missing(device_type)
    if missing is not None:
        raise missing
    why = chosen.unavailable(device_type, call)
    if why is None:
        return backend, "requested"
    name = next(n for n in chosen.fallback + ("gather",) if BACKEND_TABLE[n].unavailable(device_type, call) is None)
    return name, f"{backend} cannot serve this call: {why}"


def _measured_auto(args, call: _Call, tuner: BackendTuner | None) -> tuple[str, str]:
    """``auto`` for one call: the fixed order for small calls or a single candidate, else the measured choice."""
    q, block_mask, bq, bk = args[0], args[3], args[4], args[5]
    dev = q.device.type
    name, reason = select_backend("auto", dev, needs_grad=call.needs_grad, return_lse=call.return_lse,
                                  block_size=(bq, bk), pairs=call.pairs)
    tuner = tuner if tuner is not None else default_tuner(AUTO_FLEX_MIN_PAIRS)
    if call.pairs < tuner.min_pairs:
        return name, reason
    usable, _ = _auto_candidates(dev, call, small_rule=False)
    if len(usable) < 2:
        return name, reason
    key = tune_key(dev, q.dtype, head_dim=q.shape[-1], pairs=call.pairs, block=(bq, bk),
                   density=float(block_mask.float().mean()), needs_grad=call.needs_grad,
                   return_lse=call.return_lse)
    runs = {n: functools.partial(BACKEND_TABLE[n].run, *args, needs_grad=call.needs_grad) for n in usable}
    return tuner.choose(q.device, key, runs)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _validate(q, k, v, block_mask, bq, bk, extra_k, extra_v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D]; got shape {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype must be one of float32/float16/bfloat16; got {t.dtype}")
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k, v must share [B, H]; got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[-1] != D:
        raise ValueError(f"k head dim must equal q's ({D}); got k {_shape(k)} vs q {_shape(q)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's length {k.shape[2]}; got v {_shape(v)} vs k {_shape(k)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    Sk, Dv = k.shape[2], v.shape[-1]
    if Sq == 0 or Sk == 0:
        raise ValueError(f"empty sequence: q length {Sq}, k length {Sk}")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together")
    if extra_k is not None:
        if extra_k.dim() != 4 or extra_k.shape[:2] != (B, H) or extra_k.shape[-1] != D:
            raise ValueError(f"extra_k must be [B, H, Se, D] = [{B}, {H}, Se, {D}]; got {_shape(extra_k)}")
        if extra_v.dim() != 4 or extra_v.shape[:3] != extra_k.shape[:3] or extra_v.shape[-1] != Dv:
            raise ValueError(
                f"extra_v must be [B, H, Se, Dv] = [{B}, {H}, {extra_k.shape[2]}, {Dv}]; got {_shape(extra_v)}"
            )
        if extra_k.dtype != q.dtype or extra_v.dtype != q.dtype:
            raise TypeError(f"extra_k/extra_v dtype must be q's {q.dtype}; got {extra_k.dtype}, {extra_v.dtype}")
        if extra_k.device != q.device or extra_v.device != q.device:
            raise ValueError("extra_k/extra_v must be on q's device")
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        got = block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        raise TypeError(f"block_mask must be a bool tensor; got {got}")
    nq, nk = num_blocks(Sq, bq), num_blocks(Sk, bk)
    ok = (
        block_mask.dim() == 4
        and block_mask.shape[0] in (1, B)
        and block_mask.shape[1] in (1, H)
        and tuple(block_mask.shape[2:]) == (nq, nk)
    )
    if not ok:
        raise ValueError(
            f"block_mask must be [B or 1, H or 1, ceil(Sq/bq), ceil(Sk/bk)] = [{B} or 1, {H} or 1, "
            f"ceil({Sq}/{bq})={nq}, ceil({Sk}/{bk})={nk}]; got {_shape(block_mask)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}; got {block_mask.device}")
    if extra_k is None or extra_k.shape[2] == 0:
        empty = ~block_mask.any(-1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).tolist()
            shown = ", ".join(str(tuple(r)) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
            raise ValueError(
                f"block_mask has {len(rows)} query-block row(s) with no key block (b, h, query_block): {shown}; "
                f"every query block must attend at least one key block (or pass extra_k/extra_v)"
            )


def _token_mask_with_extra(q, k, v, block_mask, bq, bk, extra_k, extra_v):
    """The block mask expanded to tokens, with the extra keys (always attended) appended to it and to K/V."""
    tok = block_to_token_mask(block_mask, (bq, bk), q.shape[2], k.shape[2])
    if extra_k is not None:
        tok = torch.cat([tok, tok.new_ones(*tok.shape[:-1], extra_k.shape[2])], dim=-1)
        k = torch.cat([k, extra_k], dim=2)
        v = torch.cat([v, extra_v], dim=2)
    return tok, k, v


def dense_block_sparse(q, k, v, block_mask, bq, bk, scale, extra_k=None, extra_v=None, return_lse=False):
    """The oracle: SDPA (or float32 math when the LSE is wanted) with the expanded token mask."""
    tok, k, v = _token_mask_with_extra(q, k, v, block_mask, bq, bk, extra_k, extra_v)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale), None
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype)
    return out, lse


def _xformers_block_sparse(q, k, v, block_mask, bq, bk, scale, extra_k=None, extra_v=None, return_lse=False):
    """Dense xformers memory-efficient attention with the expanded mask as an additive bias (GPU helper)."""
    import xformers.ops as xops

    if return_lse:
        raise NotImplementedError("backend='xformers' does not return the LSE; use another backend")
    Sq = q.shape[2]
    tok, k, v = _token_mask_with_extra(q, k, v, block_mask, bq, bk, extra_k, extra_v)
    B, H = q.shape[:2]
    bias = torch.zeros(tok.shape, dtype=q.dtype, device=q.device).masked_fill(~tok, float("-inf"))
    bias = bias.expand(B, H, Sq, k.shape[2])
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2), None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int | Sequence[int] = 128,
    *,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    tuner: BackendTuner | None = None,
):
    """Block-sparse softmax attention.

    Query block ``i`` of head ``h`` in batch ``b`` attends key block ``j`` iff ``block_mask[b, h, i, j]``
    (batch/head dims of size 1 broadcast), plus every key of ``extra_k``/``extra_v`` (joined exactly in one
    softmax). ``q``: ``[B, H, Sq, D]``, ``k``: ``[B, H, Sk, D]``, ``v``: ``[B, H, Sk, Dv]``; lengths need not be
    multiples of the block size (keys past ``Sk`` are never attended). ``block_size``: int or ``(bq, bk)``.

    Returns ``out [B, H, Sq, Dv]`` in q's dtype, and with ``return_lse=True`` also ``lse [B, H, Sq]``
    (float32, natural log) of the whole attention. ``backend``: ``"auto"``, ``"flex"``, ``"triton"``,
    ``"gather"``, ``"dense"`` or ``"xformers"``. ``"auto"`` times the backends that can serve a large call
    the first time it meets its class and reuses the fastest (cached on disk per machine; ``tuner`` says where,
    default :func:`~attnproc.kernels.autotune.default_tuner`); smaller calls and ``ATTNPROC_BACKEND=static``
    follow :func:`select_backend`'s fixed order. ``ATTNPROC_BACKEND=<name>`` makes ``auto`` mean that backend.
    """
    bq, bk = normalize_block_size(block_size)
    _validate(q, k, v, block_mask, bq, bk, extra_k, extra_v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    tensors = (q, k, v) + ((extra_k, extra_v) if extra_k is not None else ())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    se = extra_k.shape[2] if extra_k is not None else 0
    B, H, Sq = q.shape[:3]
    pairs = B * H * Sq * (k.shape[2] + se)
    dev = q.device.type
    args = (q, k, v, block_mask, bq, bk, scale, extra_k, extra_v, return_lse)
    requested = backend
    if backend == "auto":
        requested = forced_backend() or "auto"  # ATTNPROC_BACKEND overrides what auto resolves to
    if requested == "auto":
        name, reason = _measured_auto(args, _Call(needs_grad, return_lse, bq, bk, pairs), tuner)
    else:
        name, reason = select_backend("auto" if requested == "static" else requested, dev, needs_grad=needs_grad,
                                      return_lse=return_lse, block_size=(bq, bk), pairs=pairs)
        if requested not in ("auto", "static", name):
            origin = f"{BACKEND_ENV}={requested}" if backend == "auto" else f"backend={requested!r}"
            warnings.warn(f"{origin} -> {name!r}: {reason}", BackendFallbackWarning, stacklevel=2)
    try:
        out, lse = recorded_run(lambda: BACKEND_TABLE[name].run(*args, needs_grad=needs_grad), name=name,
                                reason=reason, q=q, k_len=k.shape[2], extra_len=se, block_mask=block_mask, bq=bq,
                                bk=bk)
    except Exception as exc:  # compile failures (no compiler, inductor bug): auto falls back once, memoised
        if name != "flex":
            raise
        if backend != "auto":
            raise RuntimeError(f"flex backend failed: {exc}") from exc
        _flex_failed[dev] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"auto: flex failed ({_flex_failed[dev]}); using gather from now on",
                      BackendFallbackWarning, stacklevel=2)
        out, lse = gather_attention(*args, needs_grad=needs_grad)
    return (out, lse) if return_lse else out
