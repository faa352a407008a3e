"""Mask modulation: region-controlled generation for images and video.

The DenseDiffusion score modulation (value-range adaptive, pre-softmax), used MAKIMA/VideoGrain-style with one
mask per region (and per frame for video):

    S' = S + c·M⊙(rowmax(S) − S) − c·(1 − M)⊙(S − rowmin(S)),      c = strength·σ,  σ = 1 − area

Cross-attention: query tokens in region n are pulled toward region n's phrase tokens and pushed away from all
others. Self-attention: tokens of the same region are pulled together (across frames for video). Joint
attention (Flux, SD3, CogVideoX): the image→text block gets the cross rule, the image→image block the self rule,
each relative to its own block's score range; text queries are left alone. Only the conditional branch is
modulated, only while the step is inside the active window; everywhere else the call goes to the inner method
untouched (no scores are materialised).

    attnproc.apply(pipe, "maskmod", prompt="a red fox in the snow",
                   regions=[{"phrase": "a red fox", "mask": "fox.png"}])
    attnproc.apply(pipe, ["radial", "maskmod"], radial={...}, maskmod={...})     # with a sparse base

The region format is in :mod:`attnproc.steer.regions` and docs/maskmod.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..method import Edit, Method
from ..options import option
from ..registry import register
from ..site import Site
from .regions import GridMaps, Region, check_phrases, grid_maps, parse_regions

__all__ = ["modulate_scores", "phrase_mass_share", "MaskMod", "MaskModConfig", "time_strength"]


# ---------------------------------------------------------------------------------------------------------
def modulate_scores(scores: torch.Tensor, mask: torch.Tensor, strength, area=None) -> torch.Tensor:
    """Value-range adaptive modulation of pre-softmax ``scores [..., Q, K]`` (a new tensor is returned).

    ``S' = S + c·M⊙(rowmax(S) − S) − c·(1 − M)⊙(S − rowmin(S))`` with ``c = strength·(1 − area)``.

    ``mask`` (bool or float in [0, 1]) broadcasts to ``scores``; ``strength`` is a number or a tensor that
    broadcasts to ``[..., Q, 1]`` (or to ``scores``); ``area`` (per query, broadcasting to ``[..., Q]``) is the size
    regulariser, ``None`` meaning σ = 1. The coefficient ``c`` is clamped to [0, 1], so a row never leaves its
    original [min, max] (strength 1 moves in-mask scores to the row max and the rest to the row min).
    Entries at ``-inf`` (masked out) stay ``-inf`` and do not count for the row's max and min.
    """
    out = scores.clone()
    coef = torch.as_tensor(strength, dtype=scores.dtype, device=scores.device)
    if area is not None:
        area = torch.as_tensor(area, dtype=scores.dtype, device=scores.device)
        coef = coef * (1 - area).unsqueeze(-1)
    _modulate_(out, mask, coef)
    return out


def _modulate_(s: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor) -> None:
    """In place, memory-lean: ``S' = (1 − c)·S + c·(rowmin + M·(rowmax − rowmin))``, which equals the formula
    above, then clamped to the row range (against rounding). ``s`` may be a view (one block of a joint matrix)."""
    finite = torch.isfinite(s)
    masked = not bool(finite.all())
    rowmax = s.amax(-1, keepdim=True)
    rowmin = (s.masked_fill(~finite, float("inf")) if masked else s).amin(-1, keepdim=True)
    c = coef.clamp(0, 1)
    target = mask.to(s.dtype) * (rowmax - rowmin)
    target += rowmin
    target *= c
    if masked:
        new = (s * (1 - c)).add_(target).clamp_(min=rowmin, max=rowmax)
        s.copy_(torch.where(finite, new, s))
    else:
        s.mul_(1 - c).add_(target).clamp_(min=rowmin, max=rowmax)


def time_strength(timestep: float, power: float) -> float:
    """DenseDiffusion's timestep factor ``(t / 1000) ** power`` (t in scheduler units, clamped to [0, 1000])."""
    if timestep is None or not math.isfinite(timestep):
        return 0.0
    x = min(max(float(timestep) / 1000.0, 0.0), 1.0)
    return x ** power if power > 0 else 1.0


def phrase_mass_share(probs: torch.Tensor, weights: torch.Tensor, spans: torch.Tensor, *,
                      visual: slice = slice(None), text: slice = slice(None)) -> torch.Tensor:
    """The share of each phrase's cross-attention mass that falls inside its region, ``[N]``.

    ``probs [..., Q, K]`` are attention probabilities (averaged over the leading dims), ``weights [N, Qv]`` the
    region weights of the visual queries ``probs[..., visual, :]``, ``spans [N, Kt]`` the phrase-token indicator
    over the text keys ``probs[..., text]``. Share_n = Σ_i w_n[i]·m_n[i] / Σ_i m_n[i], m_n[i] the mass query i
    gives phrase n's tokens.
    """
    p = probs[..., visual, text].float()
    p = p.reshape(-1, *p.shape[-2:]).mean(0)  # [Qv, Kt]
    mass = p @ spans.float().t()  # [Qv, N]
    inside = (weights.float().t() * mass).sum(0)
    return inside / mass.sum(0).clamp_min(1e-30)


# ---------------------------------------------------------------------------------------------------------
@dataclass
class MaskModConfig:
    regions: Any = option(None, help="list of regions: {'phrase': part of the prompt, 'mask': image file / array "
                                     "/ tensor (one per frame for video) or 'box': [x0, y0, x1, y1] fractions}; "
                                     "later regions lie on top of earlier ones")
    prompt: str = option("", help="the full prompt given to the pipeline (every phrase must be part of it)")
    cross_weight: float = option(1.0, low=0.0, high=4.0, help="cross-attention modulation weight (w_c)")
    self_weight: float = option(0.3, low=0.0, high=4.0, help="self-attention modulation weight (w_s)")
    time_power: float = option(5.0, low=0.0, high=20.0,
                               help="strength schedule (t/1000)^power; 0 = constant")
    active_steps: float = option(0.3, low=0.0, high=1.0, help="fraction of the denoising steps modulated (first ones)")
    size_reg: float = option(1.0, low=0.0, high=1.0,
                             help="size regulariser: strength × (1 − size_reg·region area)")
    self_max_tokens: int | None = option(None, low=1,
                                         help="skip self-attention modulation above this many visual tokens "
                                              "(memory); None = no limit")
    chunk_mb: int = option(256, low=1, high=1 << 20, help="materialise scores in head chunks of about this size")

    def validate(self):
        self.parsed()

    def parsed(self) -> list[Region]:
        """Fresh parsed regions (the config itself stays the user's plain values)."""
        regions = parse_regions(self.regions)
        if any(r.tokens is None for r in regions):
            if not self.prompt:
                raise ValueError("give prompt=... (the full prompt you pass to the pipeline) so each region's "
                                 "phrase can be found, or give explicit 'tokens' per region")
            check_phrases(regions, self.prompt)
        return regions


@register
class MaskMod(Edit):
    """Mask modulation (DenseDiffusion formula, MAKIMA-style region masks) as an attention edit."""

    name = "maskmod"
    summary = "Region control: pull each region's pixels toward its phrase and each other (DenseDiffusion modulation)."
    Config = MaskModConfig
    needs_layout = True
    context_parallel = frozenset({"ulysses"})  # per head and per query row over the whole sequence

    def __init__(self, config=None):
        super().__init__(config)
        self.regions: list[Region] = self.config.parsed() if self.config.regions is not None else []
        self._maps: dict[tuple[int, int, int], GridMaps] = {}
        self._bound = all(r.tokens is not None for r in self.regions) and bool(self.regions)
        self.observers: list[Callable[[Site, dict], None]] = []  # called on each modulated call (tests, UIs)

    # ---- binding: phrase → text-token positions --------------------------------------------------------
    def bind(self, target) -> None:
        if not self.regions:
            raise ValueError("maskmod needs regions=[{'phrase': ..., 'mask': ...}, ...]")
        missing = [r for r in self.regions if r.tokens is None]
        if not missing:
            self._bound = True
            return
        if isinstance(target, torch.nn.Module):
            raise ValueError("maskmod applied to a bare denoiser cannot find phrase tokens: apply it to the "
                             "pipeline (its tokenizers locate each phrase) or give 'tokens' per region")
        from attnproc.pipelines.regions import text_token_spans  # pipeline glue, imported only here

        spans = text_token_spans(target, self.config.prompt, [r.phrase for r in missing])
        for r, s in zip(missing, spans):
            r.tokens = list(s)
        self._bound = True

    # ---- the edit --------------------------------------------------------------------------------------
    def strengths(self, site: Site) -> tuple[float, float]:
        """(cross, self) strengths at ``site`` before the size regulariser; (0, 0) where inactive."""
        step = site.step
        if step is None or site.layout is None or not self.regions or not self._bound:
            return 0.0, 0.0
        if step.branch == "uncond":
            return 0.0, 0.0
        if self.config.active_steps <= 0:
            return 0.0, 0.0
        if step.index is not None and step.num_steps:
            if step.index >= self.config.active_steps * step.num_steps:
                return 0.0, 0.0
        elif not (math.isfinite(step.timestep) and step.timestep >= 1000.0 * (1 - self.config.active_steps)):
            return 0.0, 0.0
        t = time_strength(step.timestep, self.config.time_power)
        return self.config.cross_weight * t, self.config.self_weight * t

    def _cond_rows(self, site: Site, batch: int) -> slice | None:
        branches = site.layout.branches
        if not branches or all(b == "cond" for b in branches):
            return slice(0, batch)
        if "cond" not in branches or batch % len(branches):
            return None
        n = batch // len(branches)
        i = branches.index("cond")
        return slice(i * n, (i + 1) * n)

    def _plan(self, site: Site, q_len: int, k_len: int):
        """Which blocks to modulate: list of (query slice, key slice, 'cross'|'self', strength)."""
        cross, self_ = self.strengths(site)
        if cross <= 0 and self_ <= 0:
            return []
        lay = site.layout
        vlen = lay.visual_len
        limit = self.config.self_max_tokens
        self_ok = self_ > 0 and (limit is None or vlen <= limit)
        if site.kind == "cross":
            if cross > 0 and q_len == vlen and lay.text_position == "separate":
                return [(slice(0, vlen), slice(0, k_len), "cross", cross)]
            return []
        if site.kind == "self":
            if self_ok and q_len == vlen and k_len == vlen:
                return [(slice(0, vlen), slice(0, vlen), "self", self_)]
            return []
        if site.kind == "joint" and q_len == lay.seq_len and k_len == q_len:
            vs, ts = lay.visual_slice, lay.text_slice
            plan = []
            if cross > 0 and lay.text_len:
                plan.append((vs, ts, "cross", cross))
            if self_ok:
                plan.append((vs, vs, "self", self_))
            return plan
        return []

    def edit(self, q, k, v, site, *, inner: Method, attn_mask=None, scale=None):
        plan = self._plan(site, q.shape[-2], k.shape[-2]) if site.layout is not None else []
        rows = self._cond_rows(site, q.shape[0]) if plan else None
        if not plan or rows is None:
            return inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        batch = q.shape[0]
        if rows.start == 0 and rows.stop == batch:
            return self._modulated(q, k, v, site, inner, plan, attn_mask, scale)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        for part in (slice(0, rows.start), slice(rows.stop, batch)):
            if part.stop > part.start:
                sub = replace(site, layout=site.layout.with_(branches=("uncond",)))
                out[part] = inner.attention(q[part], k[part], v[part], sub, attn_mask=_rows(attn_mask, part, batch),
                                            scale=scale)
        out[rows] = self._modulated(q[rows], k[rows], v[rows], site, inner, plan, _rows(attn_mask, rows, batch), scale)
        return out

    # ---- maps per grid ---------------------------------------------------------------------------------
    def grid_maps(self, site: Site) -> GridMaps:
        lay = site.layout
        key = lay.grid
        maps = self._maps.get(key)
        if maps is None:
            maps = self._maps[key] = grid_maps(self.regions, *key)
        return maps

    def _block_mask(self, maps: GridMaps, kind: str, k_len: int, device, dtype) -> torch.Tensor:
        key = (kind, k_len, device, dtype)
        m = maps.cache.get(key)
        if m is None:
            w = maps.weights.to(device=device, dtype=torch.float32)
            if kind == "self":
                m = (w.t() @ w).clamp_(0, 1)
            else:
                m = w.t() @ self.span_matrix(k_len, device)
                m = m.clamp_(0, 1)
            m = maps.cache[key] = m.to(dtype)
        return m

    def span_matrix(self, k_len: int, device=None) -> torch.Tensor:
        """[N, k_len] indicator of each region's phrase tokens among ``k_len`` text tokens."""
        t = torch.zeros(len(self.regions), k_len, device=device)
        for n, r in enumerate(self.regions):
            idx = [i for i in (r.tokens or []) if i < k_len]
            if not idx:
                raise RuntimeError(f"maskmod: the tokens of {r.describe()} ({r.tokens}) lie beyond the {k_len} text "
                                   "tokens of this model call (prompt truncated by max_sequence_length?)")
            t[n, idx] = 1.0
        return t

    def _modulated(self, q, k, v, site, inner, plan, attn_mask, scale):
        B, H, Q, D = q.shape
        K = k.shape[-2]
        scale = (1.0 / math.sqrt(D)) if scale is None else scale
        maps = self.grid_maps(site)
        masks = []
        for qs, ks, kind, strength in plan:
            k_len = len(range(K)[ks])
            m = self._block_mask(maps, kind, k_len, q.device, q.dtype)
            coef = (strength * (1 - self.config.size_reg * maps.area)).to(q.device, q.dtype)[:, None]
            masks.append((qs, ks, kind, m, coef))
        keep = inner.token_mask(site, Q, K)
        per_head = B * Q * K * q.element_size() * 3
        heads = max(1, min(H, (self.config.chunk_mb << 20) // max(per_head, 1)))
        out = torch.empty(B, H, Q, v.shape[-1], dtype=v.dtype, device=v.device)
        for h0 in range(0, H, heads):
            hs = slice(h0, min(H, h0 + heads))
            s = torch.matmul(q[:, hs] * scale, k[:, hs].transpose(-1, -2))
            if attn_mask is not None:
                am = attn_mask[:, hs] if attn_mask.ndim == 4 and attn_mask.shape[1] == H else attn_mask
                if am.dtype == torch.bool:
                    s.masked_fill_(~am, float("-inf"))
                else:
                    s += am
            if keep is not None:
                km = keep[hs] if keep.shape[0] == H else keep
                s.masked_fill_(~km.to(s.device), float("-inf"))
            raw = s.clone() if self.observers else None
            for qs, ks, kind, m, coef in masks:
                _modulate_(s[..., qs, ks], m, coef)
            if self.observers:
                heads = site.global_heads(H)[hs]  # global indices (a Ulysses rank holds a subset)
                info = {"scores": raw, "modulated": s, "weights": maps.weights, "heads": (heads.start, heads.stop),
                        "blocks": [(qs, ks, kind) for qs, ks, kind, _, _ in masks],
                        "spans": self.span_matrix(len(range(K)[masks[0][1]])) if masks[0][2] == "cross" else None}
                for fn in self.observers:
                    fn(site, info)
            p = torch.softmax(s, dim=-1)
            del s
            out[:, hs] = torch.matmul(p.to(v.dtype), v[:, hs])
            del p
        return out


def _rows(mask, rows: slice, batch: int):
    if mask is None or mask.ndim < 3 or mask.shape[0] != batch:
        return mask
    return mask[rows]
