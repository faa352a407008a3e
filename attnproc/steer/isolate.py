"""Isolation and reposition (IR-Diffusion, from the DreamStory code): keep several subjects consistent with
their reference images and apart from each other in a target image generated in the same batch.

The batch is the N reference prompts, then the scene prompt (``prompt=[ref_1, …, ref_N, scene]``; with
``num_images_per_prompt=k`` image ``j`` of every prompt forms story ``j``). In the target's self-attention:

    K = [K̃_1 … K̃_N, K_t],  V = [Ṽ_1 … Ṽ_N, V_t],  K̃_i = R_i(K_i),  Ṽ_i = R_i(V_i)
    S = Q_t·Kᵀ·scale (+ ref_bias on the reference blocks), then −∞ at
      reference block i: keys outside R_i(r_i) (and dropped keys), and every key for queries outside m_i;
      target block:      S[q ∈ m_i, k ∈ m_j] for i ≠ j  (isolation)
    out = softmax(S)·V

``R_i`` (the reposition operator) masks reference i's tokens by its subject mask r_i, crops them to the mask's
box, resizes them (nearest) to the box of the target subject mask m_i and pastes them on a zero canvas there.
(The reference repositions the hidden states before the key/value projections; a per-token linear projection
without bias commutes with it, so we reposition keys and values.) The reference images keep plain attention.
Mutual cross-attention: target pixels in m_i also attend to reference i's prompt,
``h = (1 − λ)·h_vanilla + λ·mean_i h_i`` inside the masks. Masks come from the user (boxes, arrays, files: the
region input of :mod:`.regions`) or, per subject, from the model's own attention of the previous step
(``M = mean_{p ≤ n} S^p · C``, Otsu threshold). Layers are chosen by their position among the denoiser's
self-attention modules and steps by their fraction of the denoising loop, never by counting calls.

    attnproc.apply(pipe, "isolate", prompts=[ref_1, ref_2, scene],
                   subjects=[{"phrase": "red triangle", "box": [0.05, 0.3, 0.45, 0.7]},
                             {"phrase": "blue square", "box": [0.55, 0.3, 0.95, 0.7]}])
    pipe(prompt=[ref_1, ref_2, scene], ...)

docs/isolate.md has the details and the measured effect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnproc.kernels import dense_attention
from ..method import Edit, Method
from ..options import option
from ..registry import register
from ..site import Site
from .regions import Region, check_phrases, grid_maps, parse_regions

__all__ = ["reposition", "isolation_keep", "isolated_attention", "mutual_cross", "otsu_threshold",
           "attention_subject_map", "Isolate", "IsolateConfig"]


# ---------------------------------------------------------------------------------------------------------
def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of a non-empty bool ``[h, w]`` mask."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def reposition(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, height: int, width: int):
    """The reposition operator R: ``x [..., h·w, C]`` tokens of one reference image, masked by ``src`` (bool
    ``[h·w]``), cropped to ``src``'s box, resized (nearest) to the size of ``dst``'s box and pasted on a zero
    canvas there. Returns ``(moved [..., h·w, C], moved_mask [h·w] bool)`` (``src`` moved the same way). An empty
    ``src`` or ``dst`` gives zeros and an empty mask (the subject then takes no part)."""
    lead, c = x.shape[:-2], x.shape[-1]
    out = x.new_zeros(x.shape)
    moved = torch.zeros(height * width, dtype=torch.bool, device=x.device)
    src2, dst2 = src.reshape(height, width), dst.reshape(height, width)
    if not src2.any() or not dst2.any():
        return out, moved
    st, sb, sl, sr = _box(src2)
    dt, db, dl, dr = _box(dst2)
    size = (db - dt + 1, dr - dl + 1)
    grid = (x * src.to(x.dtype)[:, None]).reshape(-1, height, width, c).permute(0, 3, 1, 2)
    crop = grid[:, :, st:sb + 1, sl:sr + 1]
    canvas = out.reshape(-1, height, width, c).permute(0, 3, 1, 2)
    canvas[:, :, dt:db + 1, dl:dr + 1] = F.interpolate(crop.float(), size=size, mode="nearest").to(x.dtype)
    mcrop = src2[st:sb + 1, sl:sr + 1].float()[None, None]
    mcanvas = moved.reshape(height, width)
    mcanvas[dt:db + 1, dl:dr + 1] = F.interpolate(mcrop, size=size, mode="nearest")[0, 0] > 0.5
    return canvas.permute(0, 2, 3, 1).reshape(*lead, height * width, c), moved


def isolation_keep(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[Q, Q]``: False where the query lies in subject i's mask and the key in subject j's, i ≠ j.
    ``masks`` is bool ``[N, Q]``."""
    m = masks.float()
    same = m.t() @ m  # [Q, Q]: pairs sharing a subject
    inside = m.sum(0) > 0
    return ~(inside[:, None] & inside[None, :] & (same == 0))


def isolated_attention(q, k_t, v_t, k_refs, v_refs, ref_masks, tgt_masks, height, width, *, reposition_refs=True,
                       isolate=True, ref_bias=0.0, key_keep=None, target_keep=None, scale=None):
    """The target image's self-attention with repositioned reference blocks and isolation.

    ``q, k_t, v_t [H, Q, D]`` (one target image), ``k_refs, v_refs [N, H, Q, D]`` (its references),
    ``ref_masks, tgt_masks`` bool ``[N, Q]`` (r_i, m_i on this token grid), ``key_keep`` bool ``[N, Q]`` (mask-token
    dropout on the moved reference keys, ``None`` = keep all), ``target_keep`` bool ``[H or 1, Q, Q]`` (the base
    method's pattern on the target block). Returns ``[H, Q, Dv]``.
    """
    n, qn = tgt_masks.shape
    keep_t = torch.ones(qn, qn, dtype=torch.bool, device=q.device)
    if isolate and n:
        keep_t = isolation_keep(tgt_masks)
    keep_t = keep_t[None] if target_keep is None else keep_t[None] & target_keep.to(q.device)
    ks, vs, blocks = [], [], []
    if reposition_refs:
        for i in range(n):
            kr, moved = reposition(k_refs[i], ref_masks[i], tgt_masks[i], height, width)
            vr, _ = reposition(v_refs[i], ref_masks[i], tgt_masks[i], height, width)
            if key_keep is not None:
                moved = moved & key_keep[i]
            ks.append(kr)
            vs.append(vr)
            blocks.append(tgt_masks[i][:, None] & moved[None, :])  # query gating x key mask
    if not blocks:
        return dense_attention(q[None], k_t[None], v_t[None], attn_mask=keep_t[None], scale=scale)[0]
    keep = torch.cat([b[None].expand(keep_t.shape[0], -1, -1) for b in blocks] + [keep_t], dim=-1)
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
    if ref_bias:
        bias[..., :n * qn] = ref_bias
    bias.masked_fill_(~keep, float("-inf"))
    kk = torch.cat(ks + [k_t], dim=-2)
    vv = torch.cat(vs + [v_t], dim=-2)
    return dense_attention(q[None], kk[None], vv[None], attn_mask=bias[None], scale=scale)[0]


def mutual_cross(h_vanilla, q, k_refs, v_refs, tgt_masks, lam, *, ref_mask=None, scale=None):
    """Mutual cross-attention of one target image: ``h_vanilla [H, Q, Dv]``, ``q [H, Q, D]``, reference text keys
    and values ``[N, H, T, D]`` (``ref_mask``: their key masks, ``[N, ...]`` or ``None``), ``tgt_masks [N, Q]``.
    Inside the masks ``(1 − λ)·h_vanilla + λ·mean_i h_i`` (the mean over the subjects whose mask holds the pixel),
    elsewhere ``h_vanilla``."""
    w = tgt_masks.to(h_vanilla.dtype)  # [N, Q]
    count = w.sum(0)  # [Q]
    if not bool((count > 0).any()):
        return h_vanilla
    mixed = torch.zeros_like(h_vanilla)
    for i in range(tgt_masks.shape[0]):
        if not bool(tgt_masks[i].any()):
            continue
        am = None if ref_mask is None else ref_mask[i][None]
        h_i = dense_attention(q[None], k_refs[i][None], v_refs[i][None], attn_mask=am, scale=scale)[0]
        mixed += w[i][None, :, None] * h_i
    inside = count > 0
    mean = mixed / count.clamp_min(1)[None, :, None]
    blended = (1 - lam) * h_vanilla + lam * mean
    return torch.where(inside[None, :, None], blended, h_vanilla)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut of a ``bins``-bin histogram over [min, max] that maximises the
    between-class variance; values above it are foreground."""
    x = values.detach().flatten().double()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return hi
    hist = torch.histc(x, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    m0 = torch.cumsum(hist * centres, 0)
    mu0 = m0 / w0.clamp_min(1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    k = int(torch.argmax(between))
    return lo + (k + 1) * (hi - lo) / bins  # the upper edge of the last background bin


def attention_subject_map(self_probs: torch.Tensor, cross: torch.Tensor, exponent: int = 4) -> torch.Tensor:
    """The reference's attention mask map: ``M = (1/n)·Σ_{p=1..n} S^p · C``, scaled to [0, 1].

    ``self_probs [Q, Q]`` (head-averaged self-attention), ``cross [Q]`` (the subject tokens' cross-attention)."""
    s = self_probs.double()
    c = cross.double()
    acc = torch.zeros_like(c)
    cur = c
    for _ in range(exponent):
        cur = s @ cur
        acc += cur
    m = acc / exponent
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo)).float() if hi > lo else torch.zeros_like(m, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
_SUBJECT_KEYS = {"phrase", "box", "mask", "tokens", "reference_box", "reference_mask", "reference_tokens"}


@dataclass
class IsolateConfig:
    subjects: Any = option(None, help="list of subjects, one per reference prompt: {'phrase': the subject's words "
                                      "(in its reference prompt and in the scene prompt), 'box': [x0, y0, x1, y1] "
                                      "fractions or 'mask': image file / array for where it goes in the scene, "
                                      "optional 'reference_box' / 'reference_mask' for where it is in its reference "
                                      "image}; masks not given come from the model's attention (Otsu)")
    prompts: Any = option(None, help="the pipeline's prompt list: the reference prompts, one per subject, then the "
                                     "scene prompt")
    start_layer: float = option(0.514, low=0.0, high=1.0,
                                help="reposition in self-attention modules from this fraction of the denoiser's "
                                     "self-attention modules on (0.514 = the reference's 36 of SDXL's 70)")
    start_step: float = option(0.0, low=0.0, high=1.0, help="first fraction of the denoising steps edited")
    end_step: float = option(1.0, low=0.0, high=1.0, help="edit steps before this fraction of the loop")
    reposition: bool = option(True, help="add the repositioned reference subjects to the target's self-attention")
    isolation: bool = option(True, help="target subjects do not attend to each other (every self-attention layer)")
    mutual_cross: bool = option(True, help="target subject pixels also attend to their reference prompt")
    mutual_lambda: float = option(0.9, low=0.0, high=1.0, help="weight λ of the mutual cross-attention output")
    ref_bias: float = option(0.0, low=-10.0, high=10.0, help="added to the reference blocks' scores (ref_sa_lambda)")
    dropout: float = option(0.5, low=0.0, high=0.95, help="fraction of the moved reference keys dropped per call "
                                                          "(mask-token dropout, for diversity)")
    seed: int = option(0, low=0, high=2**31 - 1, help="seed of the key dropout")
    mask_exponent: int = option(4, low=1, high=8, help="attention masks: powers of self-attention averaged (n)")
    mask_tokens: int = option(1024, low=1, high=1 << 16,
                              help="attention masks: record maps on token grids of at most this many tokens")
    branches: str = option("both", choices=("both", "cond"),
                           help="guidance branches edited (the reference edits both halves of the batch)")

    def validate(self):
        if self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        self.parsed()

    def parsed(self):
        """(subjects as dicts, target regions, reference regions) with the user's values checked."""
        subs = self.subjects
        if subs is None or not isinstance(subs, (list, tuple)) or not subs:
            raise ValueError("subjects: give one subject per reference, e.g. subjects=[{'phrase': 'red triangle', "
                             "'box': [0.05, 0.3, 0.45, 0.7]}, ...]")
        for i, s in enumerate(subs):
            if not isinstance(s, dict):
                raise ValueError(f"subject {i}: expected a dict {{'phrase': ..., 'box': ...}}, got {type(s).__name__}")
            unknown = sorted(set(s) - _SUBJECT_KEYS)
            if unknown:
                raise ValueError(f"subject {i}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(_SUBJECT_KEYS))}")
            if s.get("box") is not None and s.get("mask") is not None:
                raise ValueError(f"subject {i}: give at most one of 'box' or 'mask'")
            if s.get("reference_box") is not None and s.get("reference_mask") is not None:
                raise ValueError(f"subject {i}: give at most one of 'reference_box' or 'reference_mask'")
        n = len(subs)
        prompts = self.prompts
        if prompts is not None:
            if (not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in prompts)):
                raise ValueError("prompts must be a list of non-empty strings: the reference prompts, then the scene")
            if len(prompts) != n + 1:
                raise ValueError(f"{n} subject(s) need {n} reference prompt(s) and the scene prompt "
                                 f"(prompts=[ref_1, ..., ref_{n}, scene]); got {len(prompts)} prompt(s)")
        target = self._regions(subs, "", "target")
        reference = self._regions(subs, "reference_", "reference")
        for where, regions in (("scene", target), ("reference", reference)):
            sizes = {tuple(r.mask.shape[-2:]) for r in regions if r is not None and r.mask is not None}
            if len(sizes) > 1:
                raise ValueError(f"{where} masks differ in size: {sorted(sizes)}; give every mask at the image size")
        for i, s in enumerate(subs):
            phrase = s.get("phrase")
            if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
                raise ValueError(f"subject {i}: 'phrase' must be a non-empty string, got {phrase!r}")
            needs_target_tokens = target[i] is None and s.get("tokens") is None
            needs_ref_tokens = reference[i] is None and s.get("reference_tokens") is None
            if (needs_target_tokens or needs_ref_tokens) and (phrase is None or prompts is None):
                raise ValueError(f"subject {i}: without a {'box/mask' if needs_target_tokens else 'reference_box/mask'}"
                                 " its mask comes from the attention of its words: give 'phrase' and prompts=[...]"
                                 " (or explicit token positions)")
            if phrase is not None and prompts is not None:
                check_phrases([Region(phrase.strip(), index=i)], prompts[-1])
                check_phrases([Region(phrase.strip(), index=i)], prompts[i])
        return list(subs), target, reference

    @staticmethod
    def _regions(subs, prefix, where):
        out = []
        for i, s in enumerate(subs):
            box, mask = s.get(prefix + "box"), s.get(prefix + "mask")
            if box is None and mask is None:
                out.append(None)
                continue
            try:
                r = parse_regions([{"tokens": [0], "box": box} if box is not None else {"tokens": [0], "mask": mask}])[0]
            except ValueError as e:
                raise ValueError(f"subject {i} ({where} {prefix}{'box' if box is not None else 'mask'}): "
                                 f"{str(e).removeprefix('region 0: ')}") from None
            if r.frames != 1:
                raise ValueError(f"subject {i}: isolate takes image masks ([H, W]), got {r.frames} frames")
            r.index = i
            out.append(r)
        return out


@register
class Isolate(Edit):
    """IR-Diffusion's isolation and reposition attention (DreamStory code) as an attention edit."""

    name = "isolate"
    summary = ("Multi-subject consistency: the scene's subjects read their reference images (repositioned) and "
               "stay apart (IR-Diffusion).")
    Config = IsolateConfig
    needs_layout = True
    needs_prompt_batch = True
    families = ("unet",)

    def __init__(self, config=None):
        super().__init__(config)
        self.subjects, self._target, self._reference = (self.config.parsed() if self.config.subjects is not None
                                                        else ([], [], []))
        self.target_tokens = [s.get("tokens") for s in self.subjects]
        self.reference_tokens = [s.get("reference_tokens") for s in self.subjects]
        self.positions: dict[str, float] = {}  # self-attention module name -> position in [0, 1)
        self._grid_masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._maps = _MapStore()

    @property
    def needs_attention_masks(self) -> bool:
        return any(t is None for t in self._target) or any(r is None for r in self._reference)

    def bind(self, target) -> None:
        super().bind(target)
        if not self.subjects:
            raise ValueError("isolate needs subjects=[{'phrase': ..., 'box': ...}, ...]")
        from ..families import attention_modules, family_of

        model = target if isinstance(target, torch.nn.Module) else getattr(target, "unet", None)
        if model is not None:
            family = family_of(model)
            names = execution_order([n for n, m in attention_modules(model) if family.kind_of(n, m) == "self"])
            self.positions = {n: i / len(names) for i, n in enumerate(names)}
        prompts = self.config.prompts
        if prompts is None or isinstance(target, torch.nn.Module):
            return
        from attnproc.pipelines.regions import text_token_spans  # pipeline glue, imported only here

        for i, s in enumerate(self.subjects):
            phrase = s.get("phrase")
            if phrase is None:
                continue
            if self.target_tokens[i] is None:
                self.target_tokens[i] = text_token_spans(target, prompts[-1], [phrase])[0]
            if self.reference_tokens[i] is None:
                self.reference_tokens[i] = text_token_spans(target, prompts[i], [phrase])[0]

    # ---- where and when ---------------------------------------------------------------------------------
    def in_steps(self, site: Site) -> bool:
        step = site.step
        if step is None or step.index is None or not step.num_steps:
            return False
        f = step.index / step.num_steps
        return self.config.start_step <= f < self.config.end_step

    def repositions_here(self, site: Site) -> bool:
        """Reposition at this self-attention module: by its position in the denoiser, and the step fraction."""
        if not self.config.reposition or not self.in_steps(site):
            return False
        pos = self.positions.get(site.name)
        if pos is None:
            raise RuntimeError("isolate chooses layers by their position in the denoiser, which it learns when "
                               "applied with attnproc.apply(pipe, 'isolate', ...)")
        return pos >= self.config.start_layer

    def _groups(self, site: Site, batch: int):
        """[(first row of the branch chunk, copies k, edited?, branch name)] for the [refs…, target] arrangement."""
        n = len(self.subjects)
        branches = site.layout.branches or ("cond",)
        if batch % len(branches):
            raise RuntimeError(f"isolate: batch of {batch} does not split into the branches {branches}")
        chunk = batch // len(branches)
        if chunk < n + 1 or chunk % (n + 1):
            raise RuntimeError(
                f"isolate has {n} subject(s), so each batch must hold {n} reference image(s) then the scene "
                f"(prompt=[ref_1, ..., ref_{n}, scene], any num_images_per_prompt); got {chunk} image(s) per "
                f"guidance branch")
        return [(b * chunk, chunk // (n + 1), self.config.branches == "both" or name == "cond", name)
                for b, name in enumerate(branches)]

    # ---- the edit --------------------------------------------------------------------------------------
    def edit(self, q, k, v, site, *, inner: Method, attn_mask=None, scale=None):
        if site.layout is None or site.step is None or not self.subjects or site.kind == "joint":
            return inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        lay = site.layout
        self_call = site.kind == "self" and q.shape[-2] == lay.visual_len == k.shape[-2]
        cross_call = site.kind == "cross" and q.shape[-2] == lay.visual_len
        record = self.needs_attention_masks and (self_call or cross_call) and lay.visual_len <= self.config.mask_tokens
        repos = self_call and self.repositions_here(site)
        isolate = self_call and self.config.isolation
        mutual = cross_call and self.config.mutual_cross and self.in_steps(site)
        if not (record or repos or isolate or mutual):
            return inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        groups = self._groups(site, q.shape[0])
        scale_ = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
        if record:
            self._record(q, k, site, groups, attn_mask, scale_)
        out = inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        if not (repos or isolate or mutual):
            return out
        n = len(self.subjects)
        _, h, w = lay.grid
        keep_inner = inner.token_mask(site, q.shape[-2], k.shape[-2]) if self_call else None
        out = out.clone()
        for start, copies, edited, _ in groups:
            if not edited:
                continue
            for j in range(copies):
                tgt, ref = (m.to(q.device) for m in self.masks(site, j))
                if not bool(tgt.any()):
                    continue
                t = start + n * copies + j
                refs = [start + i * copies + j for i in range(n)]
                if self_call and (repos or isolate):
                    if attn_mask is not None:
                        raise RuntimeError("isolate does not take an attention mask in self-attention")
                    out[t] = isolated_attention(
                        q[t], k[t], v[t], k[refs], v[refs], ref, tgt, h, w, reposition_refs=repos, isolate=isolate,
                        ref_bias=self.config.ref_bias, key_keep=self._key_keep(site, j, tgt.shape[-1]) if repos else None,
                        target_keep=keep_inner, scale=scale)
                elif mutual:
                    am = None if attn_mask is None or attn_mask.ndim < 3 or attn_mask.shape[0] != q.shape[0] \
                        else attn_mask[refs]
                    out[t] = mutual_cross(out[t], q[t], k[refs], v[refs], tgt, self.config.mutual_lambda,
                                          ref_mask=am, scale=scale)
        return out

    def _key_keep(self, site: Site, copy: int, q_len: int):
        p = self.config.dropout
        if p <= 0:
            return None
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + (site.step.index or 0) * 10_007
                                          + (site.index or 0) * 101 + copy)
        return torch.rand(len(self.subjects), q_len, generator=g) >= p

    # ---- masks -----------------------------------------------------------------------------------------
    def masks(self, site: Site, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``(target [N, h·w], reference [N, h·w])`` at this call's grid for story ``copy``: the user's
        masks where given, the attention masks of the previous step otherwise (empty before the first)."""
        _, h, w = site.layout.grid
        user = self._grid_masks.get((h, w))
        if user is None:
            user = self._grid_masks[(h, w)] = (_binary(self._target, h, w), _binary(self._reference, h, w))
        tgt, ref = user[0].clone(), user[1].clone()
        if self.needs_attention_masks:
            auto = self._maps.masks(site.step.index, copy, h, w, len(self.subjects), self.config.mask_exponent)
            for i in range(len(self.subjects)):
                if self._target[i] is None:
                    tgt[i] = auto[1][i] if auto is not None else False
                if self._reference[i] is None:
                    ref[i] = auto[0][i] if auto is not None else False
            for i in range(len(self.subjects) - 1, 0, -1):  # later subjects lie on top: disjoint target masks
                tgt[:i] &= ~tgt[i]
        return tgt, ref

    def _record(self, q, k, site, groups, attn_mask, scale):
        """Store the head-averaged attention of the conditional branch for the attention masks."""
        cond = [g for g in groups if g[3] == "cond"] or groups[-1:]
        start, copies, _, _ = cond[0]
        n = len(self.subjects)
        rows = slice(start, start + (n + 1) * copies)
        with torch.no_grad():
            s = torch.matmul(q[rows].float() * scale, k[rows].float().transpose(-1, -2))
            if attn_mask is not None and attn_mask.ndim >= 3 and attn_mask.shape[0] == q.shape[0]:
                am = attn_mask[rows]
                s = s.masked_fill(~am, float("-inf")) if am.dtype == torch.bool else s + am
            p = torch.softmax(s, -1).mean(1)  # [rows, Q, K]
        self._maps.add(site, p, copies, n, self.target_tokens, self.reference_tokens)


def execution_order(names: list[str]) -> list[str]:
    """UNet module names in the order the forward runs them: diffusers registers ``mid_block`` after
    ``up_blocks``, but runs it between the down and up blocks."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: rank.get(n.split(".", 1)[0], 1))  # stable: keeps order within a part


def _binary(regions, h: int, w: int) -> torch.Tensor:
    """Bool ``[N, h·w]``: the user's masks on this grid (later subjects on top, each keeping at least its most
    covered token); rows of subjects without a user mask are empty."""
    out = torch.zeros(len(regions), h * w, dtype=torch.bool)
    given = [r for r in regions if r is not None]
    if not given:
        return out
    weights = grid_maps(given, 1, h, w).weights
    for r, wt in zip(given, weights):
        m = wt >= 0.5
        if not m.any():
            m[int(torch.argmax(wt))] = True
        out[r.index] = m
    return out


class _MapStore:
    """Attention maps of the current and the previous denoising step, per token grid (for attention masks)."""

    def __init__(self):
        self.step, self.current, self.previous, self.made = None, {}, {}, {}

    def _at(self, step):
        if step != self.step:
            self.previous = self.current if self.step is not None and step == self.step + 1 else {}
            self.current, self.step, self.made = {}, step, {}

    def add(self, site, probs, copies, n, tgt_tokens, ref_tokens):
        self._at(site.step.index)
        _, h, w = site.layout.grid
        entry = self.current.setdefault((h, w), {})
        if site.kind == "self":
            entry["S"] = entry.get("S", 0) + probs
            entry["nS"] = entry.get("nS", 0) + 1
            return
        c = torch.zeros(copies, 2, n, probs.shape[1])  # [copy, (reference, target), subject, Q]
        for i in range(n):
            for which, tokens, img in ((0, ref_tokens[i], i), (1, tgt_tokens[i], n)):
                if not tokens:
                    continue
                idx = [t for t in tokens if t < probs.shape[-1]]
                for j in range(copies):
                    c[j, which, i] = probs[img * copies + j][:, idx].sum(-1)
        entry["C"] = entry.get("C", 0) + c
        entry["nC"] = entry.get("nC", 0) + 1

    def masks(self, step, copy, h, w, n, exponent):
        """(reference [N, h·w], target [N, h·w]) bool from the previous step's maps, or ``None``."""
        self._at(step)
        if (copy, h, w) not in self.made:
            self.made[(copy, h, w)] = self._masks(copy, h, w, n, exponent)
        return self.made[(copy, h, w)]

    def _masks(self, copy, h, w, n, exponent):
        grids = [g for g, e in self.previous.items() if "S" in e and "C" in e]
        if not grids:
            return None
        out = torch.zeros(2, n, h * w)
        for g in grids:
            e = self.previous[g]
            s = e["S"] / e["nS"]
            c = e["C"][copy] / e["nC"]
            for which in (0, 1):
                for i in range(n):
                    img = i if which == 0 else n
                    m = attention_subject_map(s[img * (s.shape[0] // (n + 1)) + copy], c[which, i], exponent)
                    m = F.interpolate(m.reshape(1, 1, *g), size=(h, w), mode="bilinear", align_corners=False)
                    out[which, i] += m.flatten() / len(grids)
        result = torch.zeros(2, n, h * w, dtype=torch.bool)
        for which in (0, 1):
            for i in range(n):
                if out[which, i].max() > 0:
                    result[which, i] = out[which, i] > otsu_threshold(out[which, i])
        return result[0], result[1]
