"""ComfyUI nodes for the steering edits that need more than q, k and v: ``structured``, ``isolate``, ``keylock``.

ComfyUI's attention override (what :mod:`.comfy_runtime` serves methods through) hands over projected q, k, v
only, for a batch with one prompt. These edits need more: ``structured`` the text encoder (each noun phrase
encoded alone) and the cross-attention module's ``to_k``/``to_v``; ``isolate`` one prompt per batch image;
``keylock`` the text encodings and a new token. Their nodes use the patch points ComfyUI documents for this:
``set_model_attn1_replace``/``set_model_attn2_replace`` per UNet transformer block (the replacement gets
ComfyUI's projected q, k, v and runs ComfyUI's own ``optimized_attention`` for everything it does not edit, so
those rows stay bit-identical to stock and an override installed before still applies), ``APPLY_MODEL`` wrappers
(per-image prompts for isolate, the text context for keylock), the ``CLIP`` input (phrase and prompt encodings),
and ComfyUI's embedding folders (keylock's token). The formulas are the library's (``structured_attention``,
``Isolate.edit``, ``KeyLock.project_keys``/``project``). See docs/comfyui.md.

Nothing here imports ComfyUI at module level; the patches import ``comfy`` when called (inside ComfyUI).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.steer.phrases import align_phrase, locate_phrases
from attnproc.steer.structured import MATCH_TOLERANCE, StructuredConfig, aligned_contexts, structured_attention
from attnproc.layout import TokenLayout
from attnproc.method import Method
from attnproc.workflows.comfy_runtime import WRAPPER_TYPE, _branches, family_from, step_from

# ComfyUI tokenizers (attributes of ``clip.tokenizer``) whose tokens make an SD-family UNet's text context:
# SD1.x/2.x have one, SDXL both (their hidden states are concatenated per token, at the same positions).
CLIP_TOKENIZERS = ("clip_l", "clip_h", "clip_g")


# ----------------------------------------------------------------------------- phrases with ComfyUI's CLIP
def _hf_tokenizers(clip) -> dict[str, Any]:
    """The Hugging Face tokenizers inside a ComfyUI ``CLIP`` (``{key: tokenizer}``, keys as in ``clip.tokenize``)."""
    outer = getattr(clip, "tokenizer", None)
    found = {}
    for name in CLIP_TOKENIZERS:
        inner = getattr(outer, name, None)
        if inner is not None and getattr(inner, "tokenizer", None) is not None:
            found[name[len("clip_"):]] = inner
    if not found:
        raise ValueError(f"the CLIP input ({type(outer).__name__}) has no CLIP tokenizer (clip_l/clip_g); connect "
                         "the SD 1.x/2.x/SDXL checkpoint's CLIP")
    return found


def _comfy_ids(clip, text: str, key: str, name: str) -> list[int]:
    """Token ids of the first 77-token chunk ComfyUI's tokenizer makes of ``text`` for tokenizer ``key``."""
    tokens = clip.tokenize(text, return_word_ids=True)
    chunks = tokens.get(key) or tokens.get(name) or next(iter(tokens.values()))
    return [int(t[0]) if not torch.is_tensor(t[0]) else -1 for t in chunks[0]]


def bind_phrases(clip, prompt: str, located) -> list[tuple[list[int], list[int]]]:
    """Each located phrase's token positions in the prompt and alone
    (:func:`attnproc.steer.phrases.align_phrase` on the tokenizers inside ``clip``), checked against the tokens
    ComfyUI itself makes: prompt weights ``(word:1.2)``, ``embedding:`` or a prompt past 75 tokens change them,
    and are refused."""
    alignments = None
    for key, inner in _hf_tokenizers(clip).items():
        hf = inner.tokenizer
        length = int(getattr(inner, "max_length", 77))
        for text in [prompt, *(p.text for p in located)]:
            ids = list(hf(text, truncation=True, max_length=length)["input_ids"])
            comfy = _comfy_ids(clip, text, key, f"clip_{key}")
            if comfy[:len(ids) - 1] != ids[:-1]:
                raise ValueError(f"ComfyUI tokenizes {text!r} differently from plain text (prompt "
                                 "weights such as (word:1.2), embedding:..., or more than 75 tokens); give the plain "
                                 "prompt, as typed in CLIPTextEncode, without weights or embeddings")
        found = [tuple(map(list, align_phrase(hf, prompt, p, length))) for p in located]
        if alignments is not None and found != alignments:
            raise ValueError(f"the CLIP tokenizers of this model place the phrases at different "
                             f"positions ({alignments} and {found})")
        alignments = found
    return alignments


def phrase_positions(clip, prompt: str, phrase: str) -> list[int]:
    """The token positions of ``phrase`` (its first whole-word occurrence) in ``prompt``'s text context."""
    located = locate_phrases(prompt, [phrase])
    return bind_phrases(clip, prompt, located)[0][0]


def encode(clip, text: str) -> torch.Tensor:
    """``text``'s text context as CLIPTextEncode makes it (``[S, D]``, float32)."""
    return clip.encode_from_tokens(clip.tokenize(text))[0].float().cpu()


# ----------------------------------------------------------------------------- UNet blocks; structured
def transformer_blocks(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Every transformer block of a ComfyUI UNet, in execution order, by ComfyUI's patch key
    ``(block, number, index)``: the ``transformer_options["block"]`` its ``UNetModel`` sets and the block's index
    in its SpatialTransformer (the keys ``set_model_attn1_replace``/``set_model_attn2_replace`` take)."""
    groups = (("input", getattr(diffusion_model, "input_blocks", [])),
              ("middle", [getattr(diffusion_model, "middle_block", [])]),
              ("output", getattr(diffusion_model, "output_blocks", [])))
    found = {}
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", ()) or ()):
                    found[(name, number, index)] = tb
    return found


def _check_free(model, which: str, keys, method: str) -> None:
    """Refuse when another node already replaces ``which`` (attn1/attn2) in one of these blocks: ours would
    silently override it (or it ours)."""
    taken = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    clash = sorted(set(keys) & set(taken))
    if clash:
        raise ValueError(f"{method}: another node already replaces {which} in blocks {clash[:3]}; {method} would "
                         "override it: use one of the two")


class StructuredAttn2:
    """ComfyUI ``attn2`` replacement of one UNet transformer block: stock attention, then structured guidance
    on the conditional rows whose keys are the prompt's (within :data:`MATCH_TOLERANCE`), in the active steps."""

    def __init__(self, module, full: torch.Tensor, alone: list[torch.Tensor], alignments, config: StructuredConfig,
                 model_sampling=None):
        self.module, self.full, self.alone, self.alignments = module, full, alone, alignments
        self.config, self.model_sampling = config, model_sampling

    def active(self, extra: dict) -> bool:
        a = self.config.active_steps
        if a >= 1.0:
            return True
        step = step_from(extra, self.model_sampling)
        if a <= 0.0 or step is None or step.index is None:
            return False
        return step.index < a * step.num_steps

    def steered_rows(self, k: torch.Tensor, extra: dict) -> list[int]:
        chunks = extra.get("cond_or_uncond") or [0]
        batch = k.shape[0]
        if batch % len(chunks) or not self.active(extra):
            return []
        n = batch // len(chunks)
        cond = [i * n + r for i, c in enumerate(chunks) if c == 0 for r in range(n)]
        if not cond:
            return []
        full_k = self.module.to_k(self.full.to(k.device, k.dtype)[None])[0].float()
        if k.shape[1] != full_k.shape[0]:
            matched = []
        else:
            dist = (k[cond].float() - full_k).flatten(1).norm(dim=1) / full_k.norm().clamp_min(1e-12)
            matched = [r for r, d in zip(cond, dist.tolist()) if d <= MATCH_TOLERANCE]
        if not matched:
            raise RuntimeError(f"structured node: no conditional prompt of this sampler is the node's prompt "
                               f"({self.config.prompt!r}): connect the same CLIP and type the same prompt in "
                               "CLIPTextEncode and in the node")
        return matched

    def __call__(self, q, k, v, extra: dict):
        import comfy.ldm.modules.attention as attention  # inside ComfyUI

        heads = extra["n_heads"]
        out = attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                            transformer_options=extra)
        rows = self.steered_rows(k, extra)
        if not rows:
            return out
        out = out.clone()
        out[rows] = self.steer(q[rows], k[rows], v[rows], heads).to(out.dtype)
        return out

    def steer(self, q, k, v, heads: int) -> torch.Tensor:
        """Structured attention of ``[R, S, H·D]`` rows (keys/values of the prompt given: set 0)."""
        full = self.full.to(q.device, k.dtype).expand(q.shape[0], -1, -1)
        alone = [a.to(q.device, k.dtype) for a in self.alone]
        key_ctx, value_ctx = aligned_contexts(full, alone, self.alignments, self.config.mode)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        keys = [split(k) if c is full else split(self.module.to_k(c)) for c in key_ctx]
        values = [split(v) if c is full else split(self.module.to_v(c)) for c in value_ctx]
        h = structured_attention(split(q), keys, values, lambda a, b, c: dense_attention(a, b, c))
        return h.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def patch_structured(model, clip, prompt: str, phrases: str = "", parser: str = "auto", mode: str = "values",
                     active_steps: float = 1.0):
    """``model.clone()`` with structured guidance for ``prompt`` (SD-family UNets): phrases bound and encoded
    with ``clip``, one ``attn2`` replacement per transformer block. Checks everything before patching."""
    options = dict(prompt=prompt, phrases=phrases.strip() or None, parser=parser, mode=mode,
                   active_steps=active_steps)
    located = attnproc.create("structured", **options).phrases  # the library's option checks and errors
    family = family_from(model)
    if family != "unet":
        raise ValueError(f"structured: the node serves SD 1.x/2.x and SDXL UNets; this model is "
                         f"{type(getattr(model, 'model', None)).__name__} (family {family!r})")
    config = StructuredConfig(**options)
    alignments = bind_phrases(clip, prompt, located)
    full = encode(clip, prompt)
    alone = [encode(clip, p.text) for p in located]
    blocks = transformer_blocks(model.model.diffusion_model)
    _check_free(model, "attn2", blocks, "structured")
    sampling = model.get_model_object("model_sampling")
    patched = model.clone()
    for (name, number, index), block in blocks.items():
        patched.set_model_attn2_replace(StructuredAttn2(block.attn2, full, alone, alignments, config, sampling),
                                        name, number, index)
    return patched


# ----------------------------------------------------------------------------- isolate
class _ComfyAttention(Method):
    """The attention ComfyUI would run for this call (``optimized_attention``, with any override installed
    before): the inner method of :class:`IsolateAttn`, so rows isolate does not edit stay ComfyUI's own."""

    name = "comfy"

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        import comfy.ldm.modules.attention as attention  # inside ComfyUI

        if attn_mask is not None or scale is not None:
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return attention.optimized_attention(q, k, v, q.shape[1], attn_precision=self.extra.get("attn_precision"),
                                             skip_reshape=True, skip_output_reshape=True,
                                             transformer_options=self.extra)


class IsolateAttn:
    """ComfyUI ``attn1``/``attn2`` replacement of one UNet transformer block running the library's
    :class:`~attnproc.steer.isolate.Isolate` edit: the site (grid from ``activations_shape``, step, branches,
    the block's position) built from what ComfyUI passes; ComfyUI's attention as the inner method."""

    def __init__(self, method, name: str, index: int, kind: str, model_sampling=None):
        self.method, self.name, self.index, self.kind, self.model_sampling = method, name, index, kind, model_sampling

    def site(self, q_len: int, k_len: int, extra: dict):
        shape = extra.get("activations_shape")
        if shape is None or len(shape) != 4 or int(shape[2]) * int(shape[3]) != q_len:
            return None
        cross = self.kind == "cross"
        layout = TokenLayout(1, int(shape[2]), int(shape[3]), text_len=k_len if cross else 0,
                             text_position="separate" if cross else "none", branches=_branches(extra))
        return attnproc.Site(family="unet", denoiser="diffusion_model", name=self.name, index=self.index,
                             layer=self.index, kind=self.kind, layout=layout,
                             step=step_from(extra, self.model_sampling))

    def __call__(self, q, k, v, extra: dict):
        heads = extra["n_heads"]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        inner = _ComfyAttention(extra)
        site = self.site(q.shape[1], k.shape[1], extra)
        if site is None:
            out = inner.attention(split(q), split(k), split(v), None)
        else:
            out = self.method.edit(split(q), split(k), split(v), site, inner=inner)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class IsolatePrompts:
    """ComfyUI ``APPLY_MODEL`` wrapper giving each image of the batch its prompt: in the conditional rows,
    ``[ref_1 × k, …, ref_N × k, scene × k]`` (the sampler's positive is the scene; the reference rows get the
    reference prompts the node encoded). Checks the batch and that the positive is the node's scene prompt."""

    def __init__(self, references: list[torch.Tensor], scene: torch.Tensor):
        self.references, self.scene = references, scene

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        n = len(self.references)
        chunks = transformer_options.get("cond_or_uncond") or [0]
        chunk = x.shape[0] // len(chunks)
        if chunk % (n + 1):
            raise ValueError(f"isolate node: {n} reference prompt(s) and the scene need a latent batch of {n + 1} "
                             f"(or a multiple: k stories), references first; got {chunk} image(s): set the batch_size "
                             f"of the empty latent to {n + 1}")
        copies = chunk // (n + 1)
        if c_crossattn is not None and any(c == 0 for c in chunks):
            c_crossattn = c_crossattn.clone()
            scene = self.scene.to(c_crossattn)
            for b, c in enumerate(chunks):
                if c != 0:
                    continue
                start = b * chunk
                target = c_crossattn[start + n * copies:start + chunk]
                if target.shape[1:] != scene.shape or float((target - scene).norm() / scene.norm().clamp_min(1e-12)
                                                            / target.shape[0] ** 0.5) > MATCH_TOLERANCE:
                    raise ValueError("isolate node: the sampler's positive conditioning is not the node's scene prompt "
                                     "(connect the same CLIP and type the same scene prompt in CLIPTextEncode)")
                for i, ref in enumerate(self.references):
                    if ref.shape != scene.shape:
                        raise ValueError(f"isolate node: reference prompt {i + 1} encodes to {ref.shape[0]} tokens, "
                                         f"the scene to {scene.shape[0]}: keep every prompt within 75 tokens")
                    c_crossattn[start + i * copies:start + (i + 1) * copies] = ref.to(c_crossattn)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


ISOLATE_WRAPPER_KEY = "attnproc_isolate_prompts"


def patch_isolate(model, clip, references: str, scene: str, subjects, **options):
    """``model.clone()`` with isolation and reposition for a story: ``references`` one prompt per line (one per
    subject), ``scene`` the sampler's positive prompt, ``subjects`` as for the library (JSON text or a list).
    Checks everything (counts, phrases, boxes) before patching."""
    refs = [line.strip() for line in str(references).splitlines() if line.strip()]
    if isinstance(subjects, str):
        try:
            subjects = json.loads(subjects) if subjects.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"isolate: subjects is not valid JSON ({e}); e.g. [{{\"phrase\": \"red star\", "
                             f"\"box\": [0.05, 0.3, 0.45, 0.7]}}]") from None
    from attnproc.workflows.comfy_runtime import parse_widget_options

    options = parse_widget_options("isolate", options)
    method = attnproc.create("isolate", subjects=subjects, prompts=[*refs, scene], **options)
    family = family_from(model)
    if family != "unet":
        raise ValueError(f"isolate: the node serves SD 1.x/2.x and SDXL UNets; this model is "
                         f"{type(getattr(model, 'model', None)).__name__} (family {family!r})")
    for i, s in enumerate(method.subjects):
        phrase = s.get("phrase")
        if phrase is not None and method.target_tokens[i] is None:
            method.target_tokens[i] = phrase_positions(clip, scene, phrase)
        if phrase is not None and method.reference_tokens[i] is None:
            method.reference_tokens[i] = phrase_positions(clip, refs[i], phrase)
    blocks = transformer_blocks(model.model.diffusion_model)
    for which in ("attn1", "attn2"):
        _check_free(model, which, blocks, "isolate")
    names = [".".join(map(str, key)) for key in blocks]
    method.positions = {name: i / len(names) for i, name in enumerate(names)}
    wrapper = IsolatePrompts([encode(clip, r) for r in refs], encode(clip, scene))
    sampling = model.get_model_object("model_sampling")
    patched = model.clone()
    for i, (key, name) in enumerate(zip(blocks, names)):
        patched.set_model_attn1_replace(IsolateAttn(method, name, i, "self", sampling), *key)
        patched.set_model_attn2_replace(IsolateAttn(method, name, i, "cross", sampling), *key)
    patched.remove_wrappers_with_key(WRAPPER_TYPE, ISOLATE_WRAPPER_KEY)
    patched.add_wrapper_with_key(WRAPPER_TYPE, ISOLATE_WRAPPER_KEY, wrapper)
    return patched


# ----------------------------------------------------------------------------- keylock (Perfusion concepts)
CONTEXT_KEY = "attnproc_text_context"
# global locking: the superclass encoding of each prompt, a model cond of the conditioning (concept_encode), so
# ComfyUI batches, pads and orders it exactly as the prompt's own c_crossattn
SUPERCLASS_KEY = "attnproc_superclass_context"
KEYLOCK_WRAPPER_KEY = "attnproc_keylock_context"


def context_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
    """ComfyUI ``APPLY_MODEL`` wrapper: leaves the text context (the encodings ``e`` keylock edits) and, when the
    conditioning came from :func:`concept_encode`, its superclass encoding in a copy of ``transformer_options``,
    where the ``attn2`` replacements read them (the superclass encoding is taken out of the model's inputs)."""
    options = {**transformer_options, CONTEXT_KEY: c_crossattn}
    superclass = kwargs.pop(SUPERCLASS_KEY, None)
    if superclass is not None:
        options[SUPERCLASS_KEY] = superclass
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def concept_blocks(model, concepts) -> dict[str, tuple[tuple[str, int, int], torch.nn.Module]]:
    """The concepts' cross-attention modules (diffusers names, as the concept files store them) in a ComfyUI UNet:
    ``{name: (patch key, attn2 module)}``, through ComfyUI's own diffusers↔ComfyUI key map. Refuses concepts for
    another architecture or trained on other weights (the files' model fingerprint) before anything changes."""
    import comfy.utils  # inside ComfyUI

    from attnproc.errors import UnsupportedModelError
    from attnproc.pipelines.concepts import _digest

    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    blocks = transformer_blocks(model.model.diffusion_model)
    found = {}
    for i, c in enumerate(concepts):
        width = next(iter(blocks.values())).attn2.to_k.in_features if blocks else 0
        if c.i_star.numel() != width:
            raise UnsupportedModelError(f"keylock: concept {c.token!r} (concepts[{i}]) is for a {c.i_star.numel()}-wide "
                                        f"text context, this model's cross-attention takes {width} (SD 1.x: 768, "
                                        "SD 2.x: 1024, SDXL: 2048): it is for another model")
        for name in c.values:
            key = block_key(mapping.get(f"{name}.to_k.weight", ""))
            if key not in blocks:
                raise UnsupportedModelError(f"keylock: concept {c.token!r} (concepts[{i}]) has targets for the "
                                            f"cross-attention module {name!r}, which this ComfyUI model does not have: "
                                            "it is for another architecture")
            found[name] = (key, blocks[key].attn2)
        fingerprint = c.model and _digest((f"{n}.{p}", getattr(found[n][1], p).weight) for n in c.values
                                          for p in ("to_k", "to_v"))
        if c.model and c.model != fingerprint:
            raise UnsupportedModelError(f"keylock: concept {c.token!r} (concepts[{i}]) was trained on another model "
                                        f"(fingerprint {c.model}, this ComfyUI model's is {fingerprint}); retrain it "
                                        "for this model")
    return found


def block_key(comfy_name: str) -> tuple[str, int, int] | None:
    """ComfyUI's patch key of a UNet parameter name (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` →
    ``("input", 1, 0)``; the middle block is ``("middle", 0, index)``), or None for other names."""
    parts = comfy_name.split(".")
    groups = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    if parts[0] not in groups or "transformer_blocks" not in parts:
        return None
    index = int(parts[parts.index("transformer_blocks") + 1])
    return groups[parts[0]], 0 if parts[0] == "middle_block" else int(parts[1]), index


class KeyLockAttn2:
    """ComfyUI ``attn2`` replacement of one UNet block: keys and values recomputed from the text context with
    the library's :meth:`~attnproc.steer.keylock.KeyLock.project_keys` and ``project`` (the gated rank-1 edit), then ComfyUI's own
    attention. Global locking takes the keys from the superclass encoding of the prompt when the conditioning
    carries one (:func:`concept_encode`); ``notes`` is shared by the blocks of one patch (one warning)."""

    def __init__(self, method, module, o_k: torch.Tensor, o_v: torch.Tensor, notes: dict | None = None):
        self.method, self.module, self.o_k, self.o_v = method, module, o_k, o_v
        self.notes = {} if notes is None else notes

    def key_context(self, e: torch.Tensor, extra: dict) -> torch.Tensor:
        if self.method.config.locking != "global":
            return e
        superclass = extra.get(SUPERCLASS_KEY)
        if superclass is None:
            if 0 in (extra.get("cond_or_uncond") or []) and not self.notes.get("warned"):
                import logging

                self.notes["warned"] = True
                logging.warning("keylock node: locking='global' but the positive conditioning carries no superclass "
                                "encoding: encode the prompt with 'attnproc: concept encode' (its keys stay local)")
            return e
        if superclass.shape != e.shape:
            raise RuntimeError(f"keylock node: the superclass encoding {tuple(superclass.shape)} does not match the text "
                               f"context {tuple(e.shape)} (another node changed the conditioning after 'attnproc: "
                               "concept encode', e.g. ConditioningConcat)")
        return superclass.to(e)

    def __call__(self, q, k, v, extra: dict):
        import comfy.ldm.modules.attention as attention  # inside ComfyUI

        e = extra.get(CONTEXT_KEY)
        if e is None or e.shape[0] != k.shape[0] or e.shape[1] != k.shape[1]:
            raise RuntimeError("keylock node: the text context of this call is not the model's (another node "
                               "changes the cross-attention context); keylock needs the text encodings")
        new_k = self.method.project_keys(self.key_context(e, extra).to(k), self.module.to_k,
                                         self.o_k.to(k.device)).to(k.dtype)
        new_v = self.method.project(e.to(v), self.module.to_v, self.o_v.to(v.device)).to(v.dtype)
        return attention.optimized_attention(q, new_k, new_v, extra["n_heads"],
                                             attn_precision=extra.get("attn_precision"), transformer_options=extra)


def _concepts_option(concepts):
    if isinstance(concepts, str):
        text = concepts.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"keylock: concepts is not valid JSON ({e}); give one concept file path per line, or "
                                 "[{\"file\": path, \"beta\": 0.7}, ...]") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    return concepts


def keylock_method(concepts, covariance: str, **options):
    """The library's keylock (files loaded and checked) from node inputs: ``concepts`` one file path per line
    or the library's JSON list (β/τ per concept); ``covariance`` the text encoder's C file."""
    from attnproc.workflows.comfy_runtime import parse_widget_options

    options = parse_widget_options("keylock", options)
    return attnproc.create("keylock", concepts=_concepts_option(concepts), covariance=str(covariance).strip() or None,
                           **options)


def patch_keylock(model, concepts, covariance: str, **options):
    """``model.clone()`` with the concepts' key-locked rank-1 K/V edits in every cross-attention (SD 1.x/2.x,
    SDXL). The concept token reaches the text encoder through :func:`concept_clip` or :func:`concept_encode`
    (``embedding:<name>`` in the prompt); global locking needs the prompt encoded by :func:`concept_encode`."""
    method = keylock_method(concepts, covariance, **options)
    if family_from(model) != "unet":
        raise ValueError(f"keylock: the node serves SD 1.x/2.x and SDXL UNets; this model is "
                         f"{type(getattr(model, 'model', None)).__name__}")
    found = concept_blocks(model, method.concepts)
    _check_free(model, "attn2", [key for key, _ in found.values()], "keylock")
    patched = model.clone()
    notes: dict = {}
    for name, (key, module) in found.items():
        o_k = torch.stack([c.keys[name].reshape(-1).float() for c in method.concepts])
        o_v = torch.stack([c.values[name].reshape(-1).float() for c in method.concepts])
        if o_k.shape[-1] != module.to_k.weight.shape[0] or o_v.shape[-1] != module.to_v.weight.shape[0]:
            from attnproc.errors import UnsupportedModelError

            raise UnsupportedModelError(f"keylock: the concepts' targets for {name!r} have sizes {o_k.shape[-1]}/"
                                        f"{o_v.shape[-1]}, the module projects to {module.to_k.weight.shape[0]}")
        patched.set_model_attn2_replace(KeyLockAttn2(method, module, o_k, o_v, notes), *key)
    patched.remove_wrappers_with_key(WRAPPER_TYPE, KEYLOCK_WRAPPER_KEY)
    patched.add_wrapper_with_key(WRAPPER_TYPE, KEYLOCK_WRAPPER_KEY, context_wrapper)
    return patched


def embedding_name(token: str) -> str:
    """The name a concept's token takes in ComfyUI prompts (``embedding:<name>``): the token without the
    characters ComfyUI's embedding syntax stops at (``<``, ``>``, ``[``, ``]``)."""
    return "".join(ch for ch in token if ch not in "<>[]") or "concept"


def _embedding_width(clip, key: str, inner) -> int:
    """The token embedding width of the CLIP's text model ``clip_<key>`` (what ComfyUI checks an embedding
    against), else the tokenizer's nominal ``embedding_size``."""
    encoder = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
    get = getattr(getattr(encoder, "transformer", None), "get_input_embeddings", None)
    return int(get().weight.shape[1]) if get is not None else int(inner.embedding_size)


def _load_concepts(concepts) -> list:
    from attnproc.pipelines.concepts import load_concept
    from attnproc.steer.keylock import entries

    return [load_concept(e["source"]) if not hasattr(e["source"], "i_star") else e["source"]
            for e in entries(_concepts_option(concepts))]


def embedding_rows(clip, concept) -> dict[str, torch.Tensor]:
    """The concept's token embedding per ComfyUI tokenizer of ``clip`` (``{"l": [w_l], "g": [w_g]}``): a concept
    file holds one row per text encoder, concatenated in diffusers' encoder order (SDXL: CLIP-L then
    OpenCLIP-G), which is ComfyUI's ``clip_l``, ``clip_g`` order. A concept for other encoders is refused."""
    inners = _hf_tokenizers(clip)
    widths = {key: _embedding_width(clip, key, inner) for key, inner in inners.items()}
    if concept.embedding.numel() != sum(widths.values()):
        raise ValueError(f"keylock: concept {concept.token!r} has a {concept.embedding.numel()}-value token embedding, "
                         f"this CLIP's text encoders take " + " + ".join(f"{w} (clip_{k})" for k, w in widths.items())
                         + ": it is for another text encoder")
    parts = concept.embedding.reshape(-1).float().split(list(widths.values()))
    return dict(zip(widths, parts))


def concept_clip(clip, concepts, folder: str | None = None):
    """A clone of ``clip`` whose tokenizer also finds the concepts' token embeddings (ComfyUI's embedding
    mechanism: the prompt says ``embedding:<name>``, :func:`embedding_name`). Each embedding is written as a
    safetensors file with one row per text encoder under ComfyUI's own keys (``clip_l``, ``clip_g``: the SDXL
    embedding format) into ``folder`` (default: ComfyUI's temp directory), which goes first in the tokenizers'
    embedding directories; the input CLIP and its tokenizer are not changed."""
    import copy
    import hashlib

    from safetensors.torch import save_file

    items = _load_concepts(concepts)
    if folder is None:
        import folder_paths  # inside ComfyUI

        folder = folder_paths.get_temp_directory()
    inners = _hf_tokenizers(clip)
    rows = [embedding_rows(clip, c) for c in items]  # checks every concept first
    tokenizer = copy.copy(clip.tokenizer)
    digest = hashlib.sha256(b"".join(c.embedding.float().numpy().tobytes() for c in items)).hexdigest()[:12]
    target = os.path.join(folder, "attnproc_concepts", digest)
    os.makedirs(target, exist_ok=True)
    for c, row in zip(items, rows):
        save_file({inners[key].embedding_key: part.reshape(1, -1).contiguous() for key, part in row.items()},
                  os.path.join(target, f"{embedding_name(c.token)}.safetensors"))
    for key, inner in inners.items():
        own = copy.copy(inner)
        existing = inner.embedding_directory
        existing = [] if existing is None else [existing] if isinstance(existing, str) else list(existing)
        own.embedding_directory = [target, *existing]
        setattr(tokenizer, f"clip_{key}", own)
    patched = clip.clone()
    patched.tokenizer = tokenizer
    return patched


def superclass_tokens(clip, tokens: dict, concepts) -> dict:
    """ComfyUI's tokens of a prompt (``clip.tokenize`` with a :func:`concept_clip`) with every concept embedding
    replaced by its superclass word's token (weights and positions kept): the prompt as it would read with the
    superclass word, for global locking."""
    inners = _hf_tokenizers(clip)
    rows = [embedding_rows(clip, c) for c in concepts]
    ids = {}
    for c in concepts:
        for key, inner in inners.items():
            found = inner.tokenizer(c.superclass, add_special_tokens=False)["input_ids"]
            if len(found) != 1:
                raise ValueError(f"keylock: superclass {c.superclass!r} of concept {c.token!r} is {len(found)} tokens "
                                 f"for ComfyUI's clip_{key} tokenizer; global locking needs a one-token superclass")
            ids[(c.token, key)] = found[0]
    out = {}
    for key, chunks in tokens.items():
        new_chunks = []
        for chunk in chunks:
            new = []
            for item in chunk:
                token = item[0]
                if torch.is_tensor(token) and key in inners:
                    vector = token.reshape(-1).float().cpu()
                    match = next((c for c, row in zip(concepts, rows) if key in row and
                                  row[key].shape == vector.shape and torch.equal(row[key], vector)), None)
                    if match is not None:
                        item = (ids[(match.token, key)], *item[1:])
                new.append(item)
            new_chunks.append(new)
        out[key] = new_chunks
    return out


def concept_encode(clip, concepts, text: str):
    """CLIPTextEncode for prompts with concepts: the conditioning of ``text`` (``embedding:<name>`` for a
    concept's token, through :func:`concept_clip`), plus the encoding of the same prompt with each concept token
    replaced by its superclass word's, carried as a model cond of the conditioning (ComfyUI passes a
    conditioning's ``model_conds`` to the model batched and ordered like its text context); the keylock node
    with ``locking='global'`` takes its keys from it. A prompt without a concept carries its own encoding."""
    import comfy.conds  # inside ComfyUI

    items = _load_concepts(concepts)
    cclip = concept_clip(clip, items)
    tokens = cclip.tokenize(text)
    swapped = superclass_tokens(clip, tokens, items)
    conditioning = cclip.encode_from_tokens_scheduled(tokens)
    superclass = cclip.encode_from_tokens(swapped)
    out = []
    for cond, extras in conditioning:
        if superclass.shape != cond.shape:
            raise ValueError(f"concept encode: the superclass prompt encodes to {tuple(superclass.shape)}, the prompt "
                             f"to {tuple(cond.shape)}")
        model_conds = {**extras.get("model_conds", {}), SUPERCLASS_KEY: comfy.conds.CONDCrossAttn(superclass)}
        out.append([cond, {**extras, "model_conds": model_conds}])
    return out


# ----------------------------------------------------------------------------- node specs (the exported pack)
STRUCTURED_NODE = {
    "node_id": "AttnProcStructured", "display_name": "attnproc: structured",
    "description": ("Structured guidance (StructureDiffusion) on SD 1.x/2.x/SDXL: each noun phrase of the prompt "
                    "is encoded on its own with the CLIP input and written into the prompt's token positions; the "
                    "conditional cross-attention of every UNet block averages its values over them ('values') or "
                    "its outputs over a key set per phrase ('conjunction'). Type the positive prompt as in "
                    "CLIPTextEncode (plain text, no weights); phrases: parts of it, ';' between them, empty = found "
                    "by the parser. Installed as attn2 replace patches (other attn2 replacements are refused)."),
    "sockets": [{"name": "model", "type": "MODEL"}, {"name": "clip", "type": "CLIP"}],
    "output": "MODEL", "run": "steer"}
ISOLATE_NODE = {
    "node_id": "AttnProcIsolate", "display_name": "attnproc: isolate",
    "description": ("Isolation and reposition (IR-Diffusion) on SD 1.x/2.x/SDXL: a story in one batch. The empty "
                    "latent's batch is the reference images (one per subject, in the order of the reference "
                    "prompts) then the scene: batch_size = subjects + 1. The sampler's positive is the scene "
                    "prompt; the node encodes the reference prompts (one per line) with the CLIP input and gives "
                    "each reference image its own. In the scene's self-attention each subject reads its reference "
                    "image, moved into its box, and the subjects do not attend to each other. subjects: JSON, "
                    "[{\"phrase\": words in the reference and the scene prompt, \"box\": [x0, y0, x1, y1] "
                    "fractions in the scene}, ...]. Installed as attn1/attn2 replace patches."),
    "sockets": [{"name": "model", "type": "MODEL"}, {"name": "clip", "type": "CLIP"}],
    "output": "MODEL", "run": "steer"}
KEYLOCK_NODE = {
    "node_id": "AttnProcKeylock", "display_name": "attnproc: keylock",
    "description": ("Perfusion concepts (key-locked rank-1 K/V edits) on SD 1.x/2.x and SDXL: concept files "
                    "written by `attnproc train-concept` for this checkpoint (one path per line, or JSON "
                    "[{\"file\": path, \"beta\": b, \"tau\": t}] for β/τ per concept) and the text encoder's "
                    "covariance file. Files for another model are refused. Encode the prompt with 'attnproc: "
                    "concept encode' (or CLIPTextEncode on 'attnproc: concept clip'), the concept token written as "
                    "embedding:<name>. locking='global' takes the keys from the superclass prompt that 'attnproc: "
                    "concept encode' carries. Installed as attn2 replace patches."),
    "sockets": [{"name": "model", "type": "MODEL"}], "output": "MODEL", "run": "steer"}
CONCEPT_CLIP_NODE = {
    "method": None, "node_id": "AttnProcConceptClip", "display_name": "attnproc: concept clip",
    "description": ("The CLIP with the concepts' token embeddings (the same concept files as the keylock node): "
                    "write embedding:<token without <>> in the prompt, e.g. 'a photo of embedding:flag'. The input "
                    "CLIP is not changed."),
    "sockets": [{"name": "clip", "type": "CLIP"}],
    "widgets": [{"name": "concepts", "kind": "STRING", "default": "", "multiline": True,
                 "tooltip": "concept files, one path per line (or the keylock node's JSON list)"}],
    "output": "CLIP", "run": "steer"}
CONCEPT_ENCODE_NODE = {
    "method": None, "node_id": "AttnProcConceptEncode", "display_name": "attnproc: concept encode",
    "description": ("CLIPTextEncode for prompts with concepts (the keylock node's concept files): write "
                    "embedding:<token without <>> in the text. The conditioning also carries the prompt encoded with "
                    "each concept's superclass word in its place, which the keylock node uses for "
                    "locking='global'. Works with SD 1.x/2.x and SDXL CLIPs."),
    "sockets": [{"name": "clip", "type": "CLIP"}],
    "widgets": [{"name": "concepts", "kind": "STRING", "default": "", "multiline": True,
                 "tooltip": "concept files, one path per line (or the keylock node's JSON list)"},
                {"name": "text", "kind": "STRING", "default": "", "multiline": True,
                 "tooltip": "the prompt, e.g. 'a photo of embedding:my_concept on the grass'"}],
    "output": "CONDITIONING", "run": "steer"}
STEER_NODES = {"structured": STRUCTURED_NODE, "isolate": ISOLATE_NODE, "keylock": KEYLOCK_NODE}
# what each node's example graph types (the positive prompt, the node's prompt inputs, the latent batch)
EXAMPLES = {
    "structured": {"positive": "a red fox running in the snow", "inputs": {"prompt": "a red fox running in the snow"},
                   "batch_size": 1},
    "isolate": {"positive": "a red fox and a white cat in the snow",
                "inputs": {"references": "a red fox\na white cat", "scene": "a red fox and a white cat in the snow",
                           "subjects": json.dumps([{"phrase": "red fox", "box": [0.05, 0.3, 0.45, 0.9]},
                                                   {"phrase": "white cat", "box": [0.55, 0.3, 0.95, 0.9]}])},
                "batch_size": 3},
    "keylock": {"positive": "a photo of embedding:my_concept on the grass",
                "inputs": {"concepts": "concepts/my_concept.safetensors", "covariance": "concepts/clip-C.safetensors",
                           "locking": "global"},
                "batch_size": 1},
}


def steer_specs(method: str, widgets: list[dict]) -> list[dict]:
    """The node specs of a steering edit, from the registry's widgets (its library defaults): ``prompt``
    multiline, ``phrases`` plain text (``;`` between phrases, empty = found)."""
    out = []
    if method == "isolate":  # the prompt list is the reference prompts (one per line) then the scene
        widgets = [{"name": "references", "kind": "STRING", "default": "", "multiline": True,
                    "tooltip": "the reference prompts, one per line, one per subject (the first images of the "
                               "batch)"},
                   {"name": "scene", "kind": "STRING", "default": "", "multiline": True,
                    "tooltip": "the scene prompt, as typed in the sampler's positive CLIPTextEncode (plain text)"},
                   *(w for w in widgets if w["name"] != "prompts")]
    if method == "keylock":  # files as plain text; lock_keys only matters when training
        widgets = [CONCEPT_CLIP_NODE["widgets"][0] | {"tooltip": "concept files, one path per line, or JSON "
                                                                 "[{\"file\": path, \"beta\": b, \"tau\": t}]"},
                   {"name": "covariance", "kind": "STRING", "default": "", "multiline": False,
                    "tooltip": "the text encoder's covariance file (attnproc keylock-covariance)"},
                   *(w for w in widgets if w["name"] not in ("concepts", "covariance", "lock_keys"))]
    for w in widgets:
        if w["name"] == "prompt":
            w = {**w, "multiline": True, "tooltip": "the positive prompt, as typed in CLIPTextEncode (plain text)"}
        if w["name"] == "phrases":
            w = {"name": "phrases", "kind": "STRING", "default": "", "multiline": False,
                 "tooltip": "parts of the prompt, ';' between them (e.g. 'a red circle; a blue square'); empty = "
                            "found by the parser"}
        out.append(w)
    return [{**STEER_NODES[method], "method": method, "widgets": out}] + \
        ([CONCEPT_CLIP_NODE, CONCEPT_ENCODE_NODE] if method == "keylock" else [])


def run_node(node_id: str, inputs: dict):
    """What an exported steering node runs (``inputs``: its sockets and widget values by name)."""
    if node_id == STRUCTURED_NODE["node_id"]:
        return patch_structured(**inputs)
    if node_id == ISOLATE_NODE["node_id"]:
        return patch_isolate(**inputs)
    if node_id == KEYLOCK_NODE["node_id"]:
        return patch_keylock(**inputs)
    if node_id == CONCEPT_CLIP_NODE["node_id"]:
        return concept_clip(**inputs)
    if node_id == CONCEPT_ENCODE_NODE["node_id"]:
        return concept_encode(**inputs)
    raise ValueError(f"unknown attnproc steering node {node_id!r}")


def example_graph(api: dict, method: str, clip) -> None:
    """Fill a steering node's example graph (``api`` as :func:`attnproc.workflows.comfy.example_api` builds it:
    node 2 the attnproc node, 3 the positive and 4 the negative CLIPTextEncode, 5 the empty latent) with the
    method's inputs."""
    example = EXAMPLES[method]
    if method == "keylock":  # the positive prompt from the concept encode node (the superclass prompt for global)
        api["2"]["inputs"].update(example["inputs"])
        for node in ("3", "4"):  # the negative too: a conditioning carrying the superclass encoding batches only
            text = api[node]["inputs"].get("text", "")  # with its like, so cond and uncond stay one batch
            api[node] = {"class_type": CONCEPT_ENCODE_NODE["node_id"],
                         "inputs": {"clip": clip, "concepts": example["inputs"]["concepts"], "text": text}}
    else:
        api["2"]["inputs"].update(clip=clip, **example["inputs"])
    api["3"]["inputs"]["text"] = example["positive"]
    api["5"]["inputs"]["batch_size"] = example["batch_size"]
