"""Plumbing shared by the static-mask sparse methods (radial, gna).

* per-family defaults: config fields whose default is ``None`` are resolved from ``site.family`` at call time;
* joint attention: visual queries go block-sparse over the visual keys with the (valid) text keys as extra keys,
  text queries go dense over every key; the pieces are put back in the original order;
* a key-padding ``attn_mask`` (HunyuanVideo's ``[B, 1, 1, S]`` text padding) is honoured by trimming the extra
  keys per batch element; any other mask sends the call to dense attention (never a NaN).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from attnproc.kernels import dense_attention
from attnproc.schedule import Schedule

# which pipelines / families each video method serves
FAMILY_NAMES = {
    "wan": "Wan 2.1/2.2", "hunyuanvideo": "HunyuanVideo", "cogvideox": "CogVideoX", "ltx": "LTX-Video",
    "flux": "Flux.1",
}


def check_family(method: str, family: str | None, supported: tuple[str, ...]) -> None:
    if family not in supported:
        names = ", ".join(f"{f} ({FAMILY_NAMES.get(f, f)})" for f in supported)
        raise ValueError(f"method {method!r} does not support the model family {family!r}; supported families: "
                         f"{names}")


def bind_families(method: str, target, supported: tuple[str, ...]) -> list[str]:
    """The families of ``target``'s denoisers (a pipeline or a model); raises naming the supported ones."""
    from attnproc.families import family_of

    if isinstance(target, torch.nn.Module):
        models = [target]
    else:
        models = [getattr(target, n, None) for n in ("unet", "transformer", "transformer_2")]
        models = [m for m in models if isinstance(m, torch.nn.Module)]
    fams = []
    for m in models:
        try:
            fam = family_of(m).name
        except Exception:  # unknown models: apply() itself reports them
            continue
        check_family(method, fam, supported)
        fams.append(fam)
    return fams


def resolve(config, defaults: dict, step_known: bool):
    """A copy of ``config`` with every ``None`` field replaced by the family default in ``defaults``.

    Step options resolved automatically fall back to 0 when the call has no step index (direct processor use
    without our hooks), instead of raising as an explicit value does.
    """
    changes = {}
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is None and f.name in defaults:
            value = defaults[f.name]
            if f.name in ("dense_first_steps", "dense_last_steps") and not step_known:
                value = 0.0
            changes[f.name] = value
    return dataclasses.replace(config, **changes) if changes else config


def step_known(site) -> bool:
    step = site.step
    return step is not None and step.index is not None and bool(step.num_steps)


def schedule_dense(cfg, site) -> bool:
    return Schedule.dense_here(cfg, site)


# ---- attention masks ---------------------------------------------------------------------------------------
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


def joint_attention(q, k, v, layout, *, visual_attention: Callable, attn_mask=None, scale=None):
    """Joint (MMDiT) attention: visual queries through ``visual_attention(qv, kv, vv, extra_k, extra_v, scale)``
    (block-sparse over the visual keys plus every valid text key), text queries dense over all keys.

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


def self_mask_ok(attn_mask, batch: int, k_len: int) -> bool:
    """True when a self-attention call's mask keeps every key (so the sparse path may ignore it)."""
    if attn_mask is None:
        return True
    valid = key_padding(attn_mask, batch, k_len)
    return valid is not False and (valid is None or bool(valid.all()))


def full_token_mask(vis_tok: torch.Tensor, layout, q_len: int, k_len: int) -> torch.Tensor:
    """Embed a visual x visual token mask into the call's full sequence: visual queries see every valid text key,
    text queries see every key."""
    vs, ts = layout.visual_slice, layout.text_slice
    out = torch.ones(1, q_len, k_len, dtype=torch.bool)
    out[0, vs, vs] = vis_tok
    if ts.stop > ts.start and layout.text_valid is not None:
        out[0, vs, ts.start + layout.text_valid:ts.stop] = False
    return out


def run_static(q, k, v, site, layout, visual, attn_mask, scale):
    """Dispatch one call of a static-mask method by kind (shared by radial and gna)."""
    N = layout.visual_len
    if site.kind == "joint" and layout.text_position in ("before", "after") and layout.text_len:
        if q.shape[2] != layout.seq_len or k.shape[2] != layout.seq_len:
            raise RuntimeError(f"{site.name}: joint call with {q.shape[2]} queries / {k.shape[2]} keys does not "
                               f"match the layout ({layout.seq_len} tokens)")
        out = joint_attention(q, k, v, layout, visual_attention=visual, attn_mask=attn_mask, scale=scale)
        if out is None:
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return out
    if q.shape[2] != N or k.shape[2] != N:
        raise RuntimeError(f"{site.name}: self-attention over {q.shape[2]} queries / {k.shape[2]} keys does not "
                           f"match the visual grid {layout.grid} ({N} tokens)")
    if not self_mask_ok(attn_mask, q.shape[0], k.shape[2]):
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return visual(q, k, v, None, None, scale)
