"""SparseMethod: the one path every sparse attention method takes; a subclass supplies the visual attention.

    attention(q, k, v, site)
      └─ config_for(site)      the config with family defaults filled in (resolved once per family, at bind)
      └─ schedule / kinds      dense where the Schedule says so, or for kinds the sparse path does not serve
      └─ sparse_attention      splits the call by kind: self-attention is all visual; a joint (MMDiT) call's
                               visual queries attend the visual keys plus the valid text keys as extra keys,
                               its text queries go dense; a key-padding ``attn_mask`` trims the extra keys per
                               batch element, any other mask sends the call dense (never a NaN)
          └─ visual_attention  the subclass's function (below)

A subclass sets ``name``, ``summary``, ``Config`` (a :class:`Schedule` subclass; ``None`` options mean "the
family's default"), ``families``, ``defaults`` and implements::

    visual_attention(q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None) -> [B, H, N, Dv]

``q, k, v`` are ``[B, H, N, D]`` over the visual tokens only (frame-major raster order, ``N =
layout.visual_len``), ``extra_k/extra_v`` ``[B, H, T, D]`` text keys every visual query also attends (or
``None``), ``config`` the resolved config (no ``None`` family option left), ``site`` the call (for
``self.module_state(site)`` and ``site.inputs``). ``visual_token_mask(config, layout, site)`` (optional) gives
the pattern as a bool ``[N, N]`` for pictures and for edits composed on top.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, ClassVar

import torch

from attnproc.kernels import dense_attention
from attnproc.method import Method
from attnproc.schedule import Schedule
from attnproc.site import KINDS

__all__ = ["SparseMethod", "LRU", "key_padding", "joint_attention", "full_token_mask"]


class LRU(OrderedDict):
    """A small least-recently-used cache owned by one method instance (masks, plans per shape and device)."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def get_or(self, key, make: Callable[[], Any]):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.maxsize:
            self.popitem(last=False)
        return value


def fill_defaults(config, defaults: dict[str, Any], step_known: bool = True):
    """A copy of ``config`` with every ``None`` option that ``defaults`` names set from it; automatic step options
    become 0 when the call has no step index."""
    changes = {}
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is None and f.name in defaults:
            auto_step = f.name in ("dense_first_steps", "dense_last_steps") and not step_known
            changes[f.name] = 0.0 if auto_step else defaults[f.name]
    return dataclasses.replace(config, **changes) if changes else config


class SparseMethod(Method):
    """A method that runs dense wherever its :class:`Schedule` says so and its visual attention elsewhere.

    Class data: ``families`` (supported; ``None`` = every family), ``defaults`` (family name, or a variant such
    as ``"wan22"``, -> values for options left at ``None``), ``sparse_kinds`` (call kinds the sparse path
    serves; other kinds run dense). Override :meth:`sparse_attention` only for a method that handles whole calls.
    """

    Config: ClassVar[type] = Schedule
    needs_layout: ClassVar[bool] = True
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    sparse_kinds: ClassVar[tuple[str, ...]] = KINDS

    def __init__(self, config=None):
        super().__init__(config)
        self._variants: dict[str, str] = {}  # family -> defaults variant chosen at bind ("wan" -> "wan22")
        self._resolved: dict[tuple[str | None, bool], Schedule] = {}

    # ---- configuration ---------------------------------------------------------------------------------
    def bind(self, target) -> None:
        from attnproc.families import denoiser_families

        found = denoiser_families(target)
        for family, _ in found:
            self.check_family(family)
        self._variants = {f: v for f, v in found if v is not None and v in self.defaults}
        self._resolved.clear()

    @classmethod
    def resolve(cls, config, family: str | None, variant: str | None = None, step_known: bool = True):
        """A copy of ``config`` with every ``None`` option replaced by the default of ``variant`` (or else
        ``family``). Step options resolved automatically become 0 when the call has no step index (direct
        processor use without our hooks), instead of raising as an explicit value does."""
        return fill_defaults(config, cls.defaults.get(variant) or cls.defaults.get(family) or {}, step_known)

    def config_for(self, site):
        """The resolved config at ``site`` (cached per family and whether the step is known)."""
        step = site.step
        key = (site.family, step is not None and step.index is not None and bool(step.num_steps))
        cfg = self._resolved.get(key)
        if cfg is None:
            self.check_family(site.family)
            cfg = self._resolved[key] = self.resolve(self.config, site.family, self._variants.get(site.family),
                                                      key[1])
        return cfg

    def sparse_here(self, site) -> bool:
        """Whether the call at ``site`` takes the sparse path (kind served, schedule not dense)."""
        return site.kind in self.sparse_kinds and not self.config_for(site).dense_here(site)

    # ---- attention -------------------------------------------------------------------------------------
    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        if not self.sparse_here(site):
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        site.require_layout(self.name)
        return self.sparse_attention(q, k, v, site, attn_mask=attn_mask, scale=scale)

    def sparse_attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        """One call on the sparse path, split by kind into :meth:`visual_attention` calls (module docstring)."""
        config, layout = self.config_for(site), site.layout

        def visual(qv, kv, vv, ek, ev, sc):
            return self.visual_attention(qv, kv, vv, config=config, layout=layout, site=site, extra_k=ek,
                                         extra_v=ev, scale=sc)

        if site.kind == "joint" and layout.text_position in ("before", "after") and layout.text_len:
            if q.shape[2] != layout.seq_len or k.shape[2] != layout.seq_len:
                raise RuntimeError(f"{site.name}: joint call with {q.shape[2]} queries / {k.shape[2]} keys does not "
                                   f"match the layout ({layout.seq_len} tokens)")
            out = joint_attention(q, k, v, layout, visual_attention=visual, attn_mask=attn_mask, scale=scale)
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale) if out is None else out
        N = layout.visual_len
        if q.shape[2] != N or k.shape[2] != N:
            raise RuntimeError(f"{site.name}: self-attention over {q.shape[2]} queries / {k.shape[2]} keys does not "
                               f"match the visual grid {layout.grid} ({N} tokens)")
        if not _keeps_every_key(attn_mask, q.shape[0], k.shape[2]):
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return visual(q, k, v, None, None, scale)

    def visual_attention(self, q, k, v, *, config, layout, site, extra_k=None, extra_v=None, scale=None):
        raise NotImplementedError(f"{type(self).__name__} must implement visual_attention (or sparse_attention)")

    def visual_token_mask(self, config, layout, site) -> torch.Tensor | None:
        """The pattern over the visual tokens, bool ``[N, N]`` (True = kept), or ``None`` if not static."""
        return None

    def visual_block_pattern(self, config, layout, site) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pattern over the visual tokens as ``(blocks [nb, nb] bool, block of each visual token [N])``, for
        Ring context parallelism; default: the token mask, one block per token. Methods with a block mask give it
        (no ``N x N`` mask is built)."""
        vis = self.visual_token_mask(config, layout, site)
        return None if vis is None else (vis, torch.arange(vis.shape[0]))

    def ring_mask(self, site, q_len, k_len, attn_mask=None):
        """The pattern this call computes, over its whole sequence (``Method.ring_mask``, an
        :class:`attnproc.ring.BlockPattern`): where :meth:`sparse_attention` would run dense (schedule, kind, a
        mask it cannot honour) ``None``; else the visual pattern, with every text key kept (the key mask trims
        them, as ``joint_attention`` does) and text queries attending every key."""
        from attnproc.ring import BlockPattern

        layout = site.layout
        if layout is None or not self.sparse_here(site):
            return None
        found = self.visual_block_pattern(self.config_for(site), layout, site)
        if found is None:
            raise NotImplementedError(f"{self.name} declares Ring context parallelism but has no static pattern "
                                      "(visual_token_mask)")
        blocks, block_of = found
        batch = attn_mask.shape[0] if attn_mask is not None else 1
        valid = key_padding(attn_mask, batch, k_len)
        if valid is False:
            return None
        if site.kind == "joint" and layout.text_position in ("before", "after") and layout.text_len:
            if valid is not None:
                tv = valid[:, layout.text_slice]
                prefix = torch.arange(tv.shape[1], device=tv.device)[None, :] < tv.sum(dim=1, keepdim=True)
                if not bool(valid[:, layout.visual_slice].all()) or not bool((tv == prefix).all()):
                    return None  # what joint_attention refuses: the call runs dense
            nb = blocks.shape[0]  # one more block, the text: it attends and is attended by everything
            ext = torch.ones(nb + 1, nb + 1, dtype=torch.bool)
            ext[:nb, :nb] = blocks
            ids = torch.full((q_len,), nb, dtype=torch.long)
            ids[layout.visual_slice] = block_of
            return BlockPattern(ext, ids, ids)
        if valid is not None and not bool(valid.all()):
            return None
        if (q_len, k_len) != (layout.visual_len, layout.visual_len):
            raise RuntimeError(f"{site.name}: self-attention over {q_len} queries / {k_len} keys does not match the "
                               f"visual grid {layout.grid} ({layout.visual_len} tokens)")
        return BlockPattern(blocks, block_of, block_of)

    def token_mask(self, site, q_len, k_len):
        """bool ``[1, q_len, k_len]`` over the call's full sequence (text included; True = kept), or ``None``
        where this site runs dense (kinds not served, dense steps/layers) or the pattern is not static."""
        if site.layout is None or not self.sparse_here(site):
            return None
        vis = self.visual_token_mask(self.config_for(site), site.layout, site)
        return None if vis is None else full_token_mask(vis, site.layout, q_len, k_len)


# ---- attention masks and joint calls ------------------------------------------------------------------------
def key_padding(attn_mask: torch.Tensor | None, batch: int, k_len: int) -> torch.Tensor | None | bool:
    """``None`` (no mask), a bool ``[B, k_len]`` key-validity tensor for a key-only mask, or ``False`` for a
    mask that is not a key-padding mask (the caller then runs dense)."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype != torch.bool:
        if not torch.is_floating_point(m):
            m = m.bool()
        else:
            finite0 = (m == 0)
            neg = torch.isneginf(m) | (m <= -1e4)
            if not bool((finite0 | neg).all()):
                return False  # a real additive bias
            m = finite0
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[-1] != k_len or m.shape[0] not in (1, batch):
        return False
    if m.shape[1] != 1 or m.shape[2] != 1:
        first = m[:, :1, :1, :]
        if not bool((m == first).all()):
            return False
        m = first
    return m[:, 0, 0, :].expand(batch, k_len)


def _keeps_every_key(attn_mask, batch: int, k_len: int) -> bool:
    """True when a self-attention call's mask keeps every key (so the sparse path may ignore it)."""
    valid = key_padding(attn_mask, batch, k_len)
    return valid is None or (valid is not False and bool(valid.all()))


def joint_attention(q, k, v, layout, *, visual_attention: Callable, attn_mask=None, scale=None):
    """Joint (MMDiT) attention: visual queries through ``visual_attention(qv, kv, vv, extra_k, extra_v, scale)``
    (over the visual keys plus every valid text key), text queries dense over all keys.

    Returns ``None`` when ``attn_mask`` cannot be honoured this way (the caller runs dense)."""
    B = q.shape[0]
    vis, txt = layout.visual_slice, layout.text_slice
    S = q.shape[2]
    valid = key_padding(attn_mask, B, k.shape[2])
    if valid is False:
        return None
    if layout.text_len == 0 or txt.stop <= txt.start:
        counts = [0] * B
    elif valid is None:
        counts = [layout.text_len] * B
    else:
        if not bool(valid[:, vis].all()):
            return None  # a visual key is masked: not a text-padding mask
        tv = valid[:, txt]
        counts = tv.sum(dim=1).tolist()
        prefix = torch.arange(tv.shape[1], device=tv.device)[None, :] < tv.sum(dim=1, keepdim=True)
        if not bool((tv == prefix).all()):
            return None  # valid text keys are not a prefix of the text tokens
    qv, kv, vv = q[:, :, vis], k[:, :, vis], v[:, :, vis]
    kt, vt = k[:, :, txt], v[:, :, txt]

    def run(b0, b1, n):
        ek = kt[b0:b1, :, :n] if n else None
        evv = vt[b0:b1, :, :n] if n else None
        return visual_attention(qv[b0:b1], kv[b0:b1], vv[b0:b1], ek, evv, scale)

    if len(set(counts)) == 1:
        out_v = run(0, B, counts[0])
    else:  # CFG or batched prompts with different text lengths: one call per batch element
        out_v = torch.cat([run(b, b + 1, counts[b]) for b in range(B)], dim=0)
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=out_v.dtype, device=q.device)
    out[:, :, vis] = out_v
    if txt.stop > txt.start:
        tmask = attn_mask
        if tmask is not None and tmask.dim() == 4 and tmask.shape[-2] == S:
            tmask = tmask[:, :, txt]
        out[:, :, txt] = dense_attention(q[:, :, txt], k, v, attn_mask=tmask, scale=scale)
    return out


def full_token_mask(vis_tok: torch.Tensor, layout, q_len: int, k_len: int) -> torch.Tensor:
    """Embed a visual x visual token mask into the call's full sequence: visual queries see every valid text key,
    text queries see every key."""
    vs, ts = layout.visual_slice, layout.text_slice
    out = torch.ones(1, q_len, k_len, dtype=torch.bool)
    out[0, vs, vs] = vis_tok
    if ts.stop > ts.start and layout.text_valid is not None:
        out[0, vs, ts.start + layout.text_valid:ts.stop] = False
    return out
