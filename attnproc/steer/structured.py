"""Structured guidance (StructureDiffusion, Feng et al., ICLR 2023) as an attention edit.

Cross-attention keys carry layout and values carry content, so each noun phrase of the prompt is encoded on its
own (its attributes then stay with its noun) and its encoding is written into the prompt's encoding at the
phrase's token positions: ``ĉ_i`` is the full encoding ``c`` with phrase ``i``'s span replaced by the phrase's
own tokens (the reference's ``multi_align``); ``ĉ_all`` has every span replaced (``single_align``). With
queries ``Q`` of the conditional branch:

* ``mode="values"`` (the reference's default): keys ``{c}``, values ``{c, ĉ_1 … ĉ_k}``;
* ``mode="conjunction"``: keys ``{c, ĉ_1 … ĉ_k}``, values ``{ĉ_all}``;

and the reference's rule: with as many key sets as value sets the paired outputs are averaged,
``(1/n)·Σ_i softmax(Q K_iᵀ·s)·V_i``; otherwise every key set is combined with every value set,
``(1/(n_K·n_V))·Σ_i Σ_j softmax(Q K_iᵀ·s)·V_j``. Attention is linear in the values, so the second form is
``(1/n_K)·Σ_i attention(Q, K_i, mean_j V_j)``: values mode is one attention call with averaged values.

Only the conditional branch's cross-attention calls whose text is the configured prompt are changed, in the
first ``active_steps`` of the loop (the reference: every step and every cross-attention layer); everything else
goes to the inner method untouched. The phrase encodings are made once, at ``apply``, with the pipeline's own
text encoder(s): SD 1.x/2.x through CLIP, SDXL through both CLIPs (concatenated per token, as the pipeline
does; the pooled embedding is never touched, so it stays the full prompt's). See docs/structured.md.

    attnproc.apply(pipe, "structured", prompt="a red circle and a blue square")          # phrases found
    attnproc.apply(pipe, "structured", prompt=p, phrases=["a red circle", "a blue square"], mode="conjunction")
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..method import Edit, Method
from ..options import option
from ..registry import register
from ..site import Site
from .phrases import PARSERS, Phrase, align_phrase, locate_phrases, noun_phrases

__all__ = ["structured_attention", "aligned_contexts", "Structured", "StructuredConfig", "MODES"]

MODES = ("values", "conjunction")
# Relative L2 distance under which a call's text context counts as the configured prompt's encoding: fp16/bf16
# re-encodings stay well under it; on the shapes model a prompt that differs by one word is at 0.5, by a final
# period at 0.13.
MATCH_TOLERANCE = 0.02


def structured_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                         attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The reference's combination of several key and value sets (``[B, H, S, D]`` each) for queries ``q``:
    paired average when ``len(keys) == len(values)``, else the average over every (key, value) pair, computed as
    ``mean_i attend(q, K_i, mean_j V_j)``. ``attend(q, k, v)`` is the attention itself (dense or a sparse inner)."""
    if not keys or not values:
        raise ValueError("structured_attention needs at least one key set and one value set")
    acc = torch.promote_types(values[0].dtype, torch.float32)  # average in at least fp32
    if len(keys) == len(values):
        pairs = list(zip(keys, values))
    else:
        mean_v = torch.stack([v.to(acc) for v in values]).mean(0).to(values[0].dtype)
        pairs = [(k, mean_v) for k in keys]
    if len(pairs) == 1:
        return attend(q, *pairs[0])
    outs = [attend(q, k, v) for k, v in pairs]
    return torch.stack([o.to(acc) for o in outs]).mean(0).to(outs[0].dtype)


def aligned_contexts(full: torch.Tensor, alone: list[torch.Tensor], alignments: list[tuple[list[int], list[int]]],
                     mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(key contexts, value contexts) ``[..., S, D]`` for ``mode`` from the prompt's encoding ``full``, each
    phrase's own encoding ``alone[i]`` and its alignment ``(positions in the prompt, positions alone)``."""
    def put(ctx, i):
        dst, src = alignments[i]
        ctx[..., dst, :] = alone[i][..., src, :].to(ctx)
        return ctx

    multi = [put(full.clone(), i) for i in range(len(alone))]
    if mode == "values":
        return [full], [full, *multi]
    if mode == "conjunction":
        single = full.clone()
        for i in range(len(alone)):
            put(single, i)
        return [full, *multi], [single]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class StructuredConfig:
    prompt: str = option("", help="the full prompt given to the pipeline (phrases are parts of it)")
    phrases: Any = option(None, help="noun phrases encoded on their own, each a part of the prompt: a list, e.g. "
                                     "['a red circle', 'a blue square'], or one string 'a red circle; a blue "
                                     "square' (';' or new lines between phrases); None = found by the parser")
    parser: str = option("auto", choices=PARSERS,
                         help="how phrases are found when not given: 'rules' (built-in chunker), 'stanza' / "
                              "'benepar' (installed with their English model), 'auto' (a parser if usable, else "
                              "rules)")
    mode: str = option("values", choices=MODES, help="'values': one key set, values averaged over the prompt and "
                                                     "each phrase (reference default); 'conjunction': a key set "
                                                     "per phrase, one value set with every phrase")
    active_steps: float = option(1.0, low=0.0, high=1.0,
                                 help="fraction of the denoising steps steered (first ones); the reference: all")

    def validate(self):
        self.located()

    def located(self) -> list[Phrase]:
        """The phrases as spans of the prompt (given or found); empty without a prompt."""
        if self.phrases is not None and not self.prompt:
            raise ValueError("give prompt=... (the full prompt you pass to the pipeline) so the phrases can be "
                             "found in it")
        if not self.prompt:
            return []
        if isinstance(self.phrases, str):  # the UI's and ComfyUI's text boxes: ';' or new lines between phrases
            return locate_phrases(self.prompt, [p for p in re.split(r"[;\n]", self.phrases) if p.strip()])
        if self.phrases is not None:
            return locate_phrases(self.prompt, self.phrases)
        found = noun_phrases(self.prompt, self.parser)
        if not found:
            raise ValueError(f"no noun phrase of two words or more found in the prompt {self.prompt!r}; give "
                             "phrases=[...] (parts of the prompt)")
        return found


@dataclass
class _Encoded:
    """What ``bind`` computes once: the prompt's encoding, the phrases' own encodings and their alignments."""

    full: torch.Tensor  # [S, D], float32, CPU
    alone: list[torch.Tensor]
    alignments: list[tuple[list[int], list[int]]]


@register
class Structured(Edit):
    """StructureDiffusion's cross-attention with noun-phrase encodings (SD-family UNets)."""

    name = "structured"
    summary = ("Structured guidance: cross-attention values (or keys) from each noun phrase encoded alone, so "
               "attributes stay with their noun (StructureDiffusion).")
    Config = StructuredConfig
    needs_layout = True
    needs_call_inputs = True  # the module's to_k/to_v and the call's text context
    families = ("unet",)

    def __init__(self, config=None):
        super().__init__(config)
        self.phrases: list[Phrase] = self.config.located()
        self.encoded: _Encoded | None = None
        self._cache: dict = {}  # per (device, dtype): the encodings moved there; and the last context matched

    # ---- binding: phrase alignment and encodings, once --------------------------------------------------
    def bind(self, target) -> None:
        super().bind(target)
        if not self.config.prompt:
            raise ValueError("structured needs prompt=... (the full prompt you pass to the pipeline)")
        if isinstance(target, torch.nn.Module):
            raise ValueError("structured applied to a bare denoiser cannot encode the phrases: apply it to the "
                             "pipeline (its tokenizers and text encoders are needed)")
        prompt = self.config.prompt
        tokenizers = [t for t in (getattr(target, "tokenizer", None), getattr(target, "tokenizer_2", None))
                      if t is not None]
        if not tokenizers:
            raise ValueError(f"structured: {type(target).__name__} has no tokenizer")
        alignments = []
        for phrase in self.phrases:
            found = {tuple(map(tuple, align_phrase(t, prompt, phrase, t.model_max_length))) for t in tokenizers}
            if len(found) > 1:
                raise ValueError(f"structured: the tokenizers of {type(target).__name__} place {phrase.text!r} at "
                                 f"different positions {sorted(found)}")
            dst, src = found.pop()
            alignments.append((list(dst), list(src)))
        from attnproc.pipelines.regions import _encode  # pipeline glue, imported only here

        device = getattr(target, "_execution_device", None) or "cpu"
        full = _encode(target, "unet", prompt, None, device)["prompt_embeds"][0]
        alone = [_encode(target, "unet", p.text, None, device)["prompt_embeds"][0] for p in self.phrases]
        self.encoded = _Encoded(full.detach().float().cpu(), [a.detach().float().cpu() for a in alone], alignments)
        self._cache.clear()

    # ---- where it acts ----------------------------------------------------------------------------------
    def active(self, site: Site) -> bool:
        step = site.step
        if site.kind != "cross" or site.layout is None or step is None:
            return False
        if self.encoded is None:
            raise RuntimeError("structured was not bound to a pipeline (its phrases are not encoded): use "
                               "attnproc.apply(pipe, 'structured', prompt=...)")
        if step.branch == "uncond":
            return False
        a = self.config.active_steps
        if a >= 1.0:
            return True
        if a <= 0.0:
            return False
        if step.index is not None and step.num_steps:
            return step.index < a * step.num_steps
        return math.isfinite(step.timestep) and step.timestep >= 1000.0 * (1 - a)

    def steered_rows(self, site: Site, batch: int) -> list[int]:
        """Batch rows of this call to steer: conditional rows whose text is the configured prompt's encoding."""
        if not self.active(site):
            return []
        context = site.inputs.encoder_hidden_states if site.inputs is not None else None
        if context is None or site.module is None:
            raise RuntimeError("structured needs the attention module and its text context (site.module, "
                               "site.inputs), which only attnproc's diffusers processor gives")
        if context.ndim != 3 or context.shape[0] != batch:
            return []
        branches = site.layout.branches or ("cond",)
        if batch % len(branches):
            return []
        n = batch // len(branches)
        cond = [i * n + r for i, b in enumerate(branches) if b == "cond" for r in range(n)]
        last = self._cache.get("match")
        if last is not None and last[0] is context:
            matched = last[1]
        else:
            full = self._moved(context)[0]
            if context.shape[1] != full.shape[0] or context.shape[2] != full.shape[1]:
                matched = []
            else:
                rows = context[cond].float()
                dist = (rows - full.float()).flatten(1).norm(dim=1) / full.float().norm().clamp_min(1e-12)
                matched = [r for r, d in zip(cond, dist.tolist()) if d <= MATCH_TOLERANCE]
            if cond and not matched:
                raise RuntimeError(
                    f"structured: no conditional prompt of this call is the prompt it was applied with "
                    f"({self.config.prompt!r}): the pipeline renders another prompt or encodes it differently "
                    "(clip_skip, LoRA scale, prompt_embeds); apply structured with the prompt you render")
            self._cache["match"] = (context, matched)
        return matched

    def _moved(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        moved = self._cache.get(key)
        if moved is None:
            enc = self.encoded
            moved = self._cache[key] = (enc.full.to(like.device, like.dtype),
                                        [a.to(like.device, like.dtype) for a in enc.alone])
        return moved

    # ---- the edit ---------------------------------------------------------------------------------------
    def project(self, attn, context: torch.Tensor, which: str) -> torch.Tensor:
        """``to_k``/``to_v`` of ``attn`` on a text context ``[R, S, C]`` → ``[R, H, S, D]`` (as the stock
        processor computes keys and values)."""
        if getattr(attn, "norm_cross", None) is not None:
            context = attn.norm_encoder_hidden_states(context)
        x = (attn.to_k if which == "k" else attn.to_v)(context)
        x = x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)
        norm = getattr(attn, "norm_k", None) if which == "k" else None
        return norm(x) if norm is not None else x

    def edit(self, q, k, v, site, *, inner: Method, attn_mask=None, scale=None):
        rows = self.steered_rows(site, q.shape[0])
        if not rows:
            return inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        attn = site.module
        context = site.inputs.encoder_hidden_states
        if context.shape[1] != k.shape[-2]:
            raise RuntimeError(f"structured: the keys of {site.name} ({k.shape[-2]} tokens) are not the text context "
                               f"({context.shape[1]} tokens): an adapter (IP-Adapter?) changes this cross-attention")
        full = context[rows]
        alone = self._moved(context)[1]
        key_ctx, value_ctx = aligned_contexts(full, alone, self.encoded.alignments, self.config.mode)

        def sets(ctxs, own, which):  # set 0 is the call's own tensor where the context is the prompt itself
            out = []
            for ctx in ctxs:
                t = own.clone()
                if ctx is not full:
                    t[rows] = self.project(attn, ctx, which).to(own.dtype)
                out.append(t)
            return out

        keys, values = sets(key_ctx, k, "k"), sets(value_ctx, v, "v")
        if len(values) > 1 and len(keys) != len(values):  # average the values of the steered rows only
            mean_v = v.clone()
            mean_v[rows] = torch.stack([x[rows].float() for x in values]).mean(0).to(v.dtype)
            values = [mean_v]
        out = inner.attention(q, keys[0], values[0], site, attn_mask=attn_mask, scale=scale)
        if len(keys) == 1 and len(values) == 1:
            return out
        sub = replace(site, layout=site.layout.with_(branches=("cond",)))
        mask = _rows(attn_mask, rows, q.shape[0])
        parts = [out[rows].float()]
        for i in range(1, len(keys)):
            val = values[i] if len(values) == len(keys) else values[0]
            parts.append(inner.attention(q[rows], keys[i][rows], val[rows], sub, attn_mask=mask, scale=scale).float())
        out = out.clone()
        out[rows] = torch.stack(parts).mean(0).to(out.dtype)
        return out


def _rows(mask, rows: list[int], batch: int):
    if mask is None or mask.ndim < 3 or mask.shape[0] != batch:
        return mask
    return mask[rows]
