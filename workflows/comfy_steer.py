"""ComfyUI nodes for the steering edits that need more than q, k and v (``structured``; see docs/comfyui.md).

ComfyUI's attention override (what :mod:`.comfy_runtime` serves methods through) hands over projected q, k, v
only. ``structured`` needs the text encoder (each noun phrase encoded on its own) and the cross-attention
module's ``to_k``/``to_v`` (keys and values of the phrase contexts), so its node uses the patch points ComfyUI
documents for this: it encodes the phrases with the node's ``CLIP`` input and installs one
``set_model_attn2_replace`` per UNet transformer block. The replacement gets ComfyUI's projected ``q, k, v``; it
computes the stock attention for the whole batch (ComfyUI's ``optimized_attention``, so rows it does not steer are
bit-identical to stock and an attention override installed before still applies) and replaces the conditional
rows whose keys are the node's prompt by :func:`attnproc.steer.structured.structured_attention`.

Nothing here imports ComfyUI at module level; the replacement imports ``comfy.ldm.modules.attention`` when
called (inside ComfyUI).
"""
from __future__ import annotations

from typing import Any

import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.steer.phrases import align_phrase
from attnproc.steer.structured import MATCH_TOLERANCE, StructuredConfig, aligned_contexts, structured_attention
from attnproc.workflows.comfy_runtime import family_from, step_from

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
        raise ValueError(f"structured: the CLIP input ({type(outer).__name__}) has no CLIP tokenizer (clip_l/clip_g); "
                         "connect the SD 1.x/2.x/SDXL checkpoint's CLIP")
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
                raise ValueError(f"structured: ComfyUI tokenizes {text!r} differently from plain text (prompt "
                                 "weights such as (word:1.2), embedding:..., or more than 75 tokens); give the plain "
                                 "prompt, as typed in CLIPTextEncode, without weights or embeddings")
        found = [tuple(map(list, align_phrase(hf, prompt, p, length))) for p in located]
        if alignments is not None and found != alignments:
            raise ValueError(f"structured: the CLIP tokenizers of this model place the phrases at different "
                             f"positions ({alignments} and {found})")
        alignments = found
    return alignments


def encode(clip, text: str) -> torch.Tensor:
    """``text``'s text context as CLIPTextEncode makes it (``[S, D]``, float32)."""
    return clip.encode_from_tokens(clip.tokenize(text))[0].float().cpu()


# ----------------------------------------------------------------------------- the attn2 replacement
def attn2_modules(diffusion_model) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Every cross-attention module of a ComfyUI UNet by ComfyUI's patch key ``(block, number, index)``: the
    ``transformer_options["block"]`` its ``UNetModel`` sets and the transformer's index in its SpatialTransformer."""
    groups = (("input", getattr(diffusion_model, "input_blocks", [])),
              ("middle", [getattr(diffusion_model, "middle_block", [])]),
              ("output", getattr(diffusion_model, "output_blocks", [])))
    found = {}
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", ()) or ()):
                    if getattr(tb, "attn2", None) is not None:
                        found[(name, number, index)] = tb.attn2
    return found


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
    modules = attn2_modules(model.model.diffusion_model)
    taken = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    clash = sorted(set(modules) & set(taken))
    if clash:
        raise ValueError(f"structured: another node already replaces cross-attention in blocks {clash[:3]}...; "
                         "structured would override it: use one of the two")
    sampling = model.get_model_object("model_sampling")
    patched = model.clone()
    for (name, number, index), module in modules.items():
        patched.set_model_attn2_replace(StructuredAttn2(module, full, alone, alignments, config, sampling), name,
                                        number, index)
    return patched


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
STEER_NODES = {"structured": STRUCTURED_NODE}


def steer_specs(method: str, widgets: list[dict]) -> list[dict]:
    """The node specs of a steering edit, from the registry's widgets (its library defaults): ``prompt``
    multiline, ``phrases`` plain text (``;`` between phrases, empty = found)."""
    out = []
    for w in widgets:
        if w["name"] == "prompt":
            w = {**w, "multiline": True, "tooltip": "the positive prompt, as typed in CLIPTextEncode (plain text)"}
        if w["name"] == "phrases":
            w = {"name": "phrases", "kind": "STRING", "default": "", "multiline": False,
                 "tooltip": "parts of the prompt, ';' between them (e.g. 'a red circle; a blue square'); empty = "
                            "found by the parser"}
        out.append(w)
    return [{**STEER_NODES[method], "method": method, "widgets": out}]


def run_node(node_id: str, inputs: dict):
    """What an exported steering node runs (``inputs``: its sockets and widget values by name)."""
    if node_id == STRUCTURED_NODE["node_id"]:
        return patch_structured(**inputs)
    raise ValueError(f"unknown attnproc steering node {node_id!r}")
