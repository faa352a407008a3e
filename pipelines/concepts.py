"""Key-locking (Perfusion) concepts: the concept file, the shared text-encoder covariance, and the pipeline glue.

A **concept** is what training learns for one new word: the token's input embedding, ``i*`` (the text encoder's
output at the token, EMA-smoothed), and per cross-attention module the locked key target ``o*_K = W_K e_super``
and the learned value target ``o*_V``. A concept file is a safetensors file of four flat fp32 tensors
(``embedding``, ``i_star``, ``keys``, ``values``; the per-layer targets concatenated in module order) and string
metadata (token, superclass, β/τ defaults, the module names and sizes, and fingerprints of the denoiser and text
encoder it was trained on, so a file for another model is refused). SD 1.5 sized: 26,496 floats, about 104 KB.
SDXL: the embedding holds the token's row of both text encoders, concatenated; the context (and so ``i*`` and C)
is both encoders' penultimate states concatenated, as the pipeline feeds its UNet.

The **covariance** ``C`` (uncentred, of the text encoder's output encodings over the tokens of a caption list) is
estimated once per text encoder (:func:`estimate_covariance`, ``attnproc keylock-covariance``), stored in its own
file and shared by every concept of that encoder; it is never copied into concept files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["Concept", "initial_concept", "superclass_id", "save_concept", "load_concept", "save_covariance",
           "load_covariance", "estimate_covariance", "model_fingerprint", "encoder_fingerprint", "text_fingerprint",
           "text_encoders", "cross_attention_modules", "encode_prompts", "encode_for_denoiser", "add_tokens",
           "remove_tokens",
           "ConceptFileError"]

CONCEPT_FORMAT = "attnproc-keylock-concept/1"
COVARIANCE_FORMAT = "attnproc-keylock-covariance/1"


class ConceptFileError(ValueError):
    """A concept or covariance file that cannot be used (wrong format, another model, missing)."""


@dataclass
class Concept:
    """One trained concept (see the module docstring). ``keys``/``values``: module name → ``[d_out]``."""

    token: str
    superclass: str
    embedding: torch.Tensor
    i_star: torch.Tensor
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    model: str = ""
    text_encoder: str = ""
    beta: float = 0.7
    tau: float = 0.15
    extra: dict = field(default_factory=dict)  # free-form provenance (training steps, images, ...)


def _flat(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in parts.values()]) if parts else torch.zeros(0)


def save_concept(concept: Concept, path: str | os.PathLike) -> Path:
    """Write ``concept`` as a safetensors file (atomically: a partial file is renamed into place)."""
    from safetensors.torch import save_file

    if list(concept.keys) != list(concept.values):
        raise ValueError("concept keys and values must cover the same modules in the same order")
    layers = [[name, int(concept.keys[name].numel()), int(concept.values[name].numel())] for name in concept.keys]
    tensors = {"embedding": concept.embedding.detach().float().cpu().contiguous(),
               "i_star": concept.i_star.detach().float().cpu().contiguous(),
               "keys": _flat(concept.keys).contiguous(), "values": _flat(concept.values).contiguous()}
    meta = {"format": CONCEPT_FORMAT, "token": concept.token, "superclass": concept.superclass,
            "model": concept.model, "text_encoder": concept.text_encoder, "beta": repr(float(concept.beta)),
            "tau": repr(float(concept.tau)), "layers": json.dumps(layers, separators=(",", ":")),
            "extra": json.dumps(concept.extra, separators=(",", ":"), default=str)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    os.replace(partial, path)
    return path


def load_concept(path: str | os.PathLike) -> Concept:
    """Read a concept file written by :func:`save_concept`; errors name the file and what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"concept file {os.fspath(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CONCEPT_FORMAT:
                raise ConceptFileError(f"{path} is not an attnproc concept file (format {meta.get('format')!r}, "
                                       f"expected {CONCEPT_FORMAT!r})")
            t = {k: f.get_tensor(k) for k in ("embedding", "i_star", "keys", "values")}
    except ConceptFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConceptFileError(f"{path}: cannot read it as a safetensors concept file ({e})") from None
    keys, values, ko, vo = {}, {}, 0, 0
    for name, dk, dv in json.loads(meta["layers"]):
        keys[name], values[name] = t["keys"][ko:ko + dk], t["values"][vo:vo + dv]
        ko, vo = ko + dk, vo + dv
    if ko != t["keys"].numel() or vo != t["values"].numel():
        raise ConceptFileError(f"{path}: the layer table does not match the stored tensors (damaged file)")
    return Concept(token=meta["token"], superclass=meta["superclass"], embedding=t["embedding"],
                   i_star=t["i_star"], keys=keys, values=values, model=meta.get("model", ""),
                   text_encoder=meta.get("text_encoder", ""), beta=float(meta["beta"]), tau=float(meta["tau"]),
                   extra=json.loads(meta.get("extra", "{}")))


# ---- fingerprints ----------------------------------------------------------------------------------------------
def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[:4096].to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def cross_attention_modules(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's cross-attention modules (``attn2`` of the UNet's transformer blocks), in module order."""
    return [(n, m) for n, m in denoiser.named_modules()
            if n.endswith("attn2") and hasattr(m, "to_k") and hasattr(m, "to_v")]


def model_fingerprint(denoiser: torch.nn.Module) -> str:
    """Identifies the denoiser a concept was trained on: its cross-attention K/V weights (fp16, first 4096 each)."""
    return _digest((f"{n}.{p}", getattr(m, p).weight) for n, m in cross_attention_modules(denoiser)
                   for p in ("to_k", "to_v"))


def encoder_fingerprint(text_encoder: torch.nn.Module, tokenizer) -> str:
    """Identifies a text encoder: its base-vocabulary input embeddings and its last parameter (added tokens do
    not change it)."""
    emb = text_encoder.get_input_embeddings().weight[: tokenizer.vocab_size]
    last = list(text_encoder.state_dict().items())[-1]
    return _digest([("embeddings", emb), last])


def superclass_id(pipe, superclass: str, tokenizer=None) -> int:
    """The one token id of the ``superclass`` word in ``tokenizer`` (default: the first text encoder's); a word
    that splits into several tokens is refused."""
    tok = text_encoders(pipe)[0][1] if tokenizer is None else tokenizer
    ids = tok(superclass, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"superclass {superclass!r} is {len(ids)} tokens for this tokenizer; give a word that is "
                         "one token (e.g. 'teddy', 'square')")
    return ids[0]


@torch.no_grad()
def initial_concept(pipe, token: str, superclass: str, prompts: list[str]) -> Concept:
    """The training start of a concept: its embedding is the superclass word's, ``i*`` and ``e_super`` the
    superclass word's encoding at its position in ``prompts`` (templates with ``{}`` filled by the superclass),
    averaged; ``o*_K = W_K e_super`` (locked) and ``o*_V = W_V e_super`` (to be learned). With two text encoders
    (SDXL) the embedding is both encoders' rows concatenated, in encoder order."""
    parts = text_encoders(pipe)
    sid = superclass_id(pipe, superclass)
    filled = [p.format(superclass) for p in prompts]
    enc, ids = encode_prompts(pipe, filled)
    rows = [enc[b, (ids[b] == sid).nonzero()[0, 0]] for b in range(len(filled))]
    e_super = torch.stack(rows).float().mean(0)
    mods = cross_attention_modules(pipe.unet)
    return Concept(token=token, superclass=superclass,
                   embedding=torch.cat([te.get_input_embeddings().weight[superclass_id(pipe, superclass, tok)]
                                        .detach().float() for te, tok in parts]), i_star=e_super.clone(),
                   keys={n: _project(e_super, m.to_k) for n, m in mods},
                   values={n: _project(e_super, m.to_v) for n, m in mods},
                   model=model_fingerprint(pipe.unet), text_encoder=text_fingerprint(pipe))


def _project(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(linear.weight.dtype), linear.weight, linear.bias).float().detach().clone()


# ---- covariance --------------------------------------------------------------------------------------------------
def text_encoders(pipe) -> list[tuple[torch.nn.Module, object]]:
    """``[(text_encoder, tokenizer), ...]``: one pair for SD 1.x/2.x, two for SDXL (whose cross-attention context
    is both encoders' penultimate states concatenated per position)."""
    pairs = [(getattr(pipe, f"text_encoder{s}", None), getattr(pipe, f"tokenizer{s}", None)) for s in ("", "_2")]
    pairs = [(te, tok) for te, tok in pairs if te is not None and tok is not None]
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no text_encoder/tokenizer; key-locking needs a CLIP text encoder")
    return pairs


def text_fingerprint(pipe) -> str:
    """Identifies the pipeline's text encoder(s): :func:`encoder_fingerprint` of the one encoder, or a digest of
    both SDXL encoders' fingerprints."""
    prints = [encoder_fingerprint(te, tok) for te, tok in text_encoders(pipe)]
    return prints[0] if len(prints) == 1 else hashlib.sha256("+".join(prints).encode()).hexdigest()[:16]


def encode_for_denoiser(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(encodings [N, L, d], input_ids [N, L] of the first tokenizer, extra UNet inputs)`` as the pipeline
    computes them, gradients kept (training goes through it). SD 1.x/2.x: the last hidden state. SDXL: both
    encoders' penultimate hidden states concatenated, and ``added_cond_kwargs`` with the second encoder's pooled
    projection (``time_ids`` are added by the caller, who knows the image size)."""
    parts = text_encoders(pipe)
    states, ids0, extra = [], None, {}
    for n, (te, tok) in enumerate(parts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(te.device)
        ids0 = ids if ids0 is None else ids0
        if len(parts) == 1:
            states.append(te(ids)[0])
            continue
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if n == 1:
            extra = {"text_embeds": out[0]}
    return torch.cat(states, -1), ids0, extra


def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encodings [N, L, d], input_ids [N, L])``: the text encoders' output as the denoiser's cross-attention
    sees it (padded to the tokenizer's max length; see :func:`encode_for_denoiser`), gradients kept."""
    enc, ids, _ = encode_for_denoiser(pipe, prompts)
    return enc, ids


@torch.no_grad()
def estimate_covariance(pipe, captions: list[str], *, batch: int = 64, ridge: float = 1e-3) -> torch.Tensor:
    """The uncentred covariance ``C = mean(e eᵀ)`` of the text encoder's output encodings over every position of
    every caption (what the cross-attention sees), plus ``ridge · tr(C)/d · I`` so ``C`` stays invertible when the
    caption list is small. float64 ``[d, d]``."""
    if not captions:
        raise ValueError("captions: give at least one caption (the paper used about 100K)")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    total, count = None, 0
    for s in range(0, len(captions), batch):
        e = encode_prompts(pipe, captions[s:s + batch])[0].double()
        e = e.reshape(-1, e.shape[-1])
        total = e.t() @ e if total is None else total + e.t() @ e
        count += e.shape[0]
    c = total / count
    d = c.shape[0]
    return c + ridge * torch.trace(c) / d * torch.eye(d, dtype=c.dtype)


def save_covariance(c: torch.Tensor, path: str | os.PathLike, *, text_encoder: str, captions: int,
                    ridge: float) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({"C": c.double().contiguous()}, str(partial),
              metadata={"format": COVARIANCE_FORMAT, "text_encoder": text_encoder, "captions": str(captions),
                        "ridge": repr(float(ridge))})
    os.replace(partial, path)
    return path


def load_covariance(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """``(C float64 [d, d], metadata)`` from a file written by :func:`save_covariance`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"covariance file {os.fspath(path)!r} does not exist; estimate one with "
                               "`attnproc keylock-covariance --pipeline ... --captions captions.txt --output C.safetensors`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != COVARIANCE_FORMAT:
            raise ConceptFileError(f"{path} is not an attnproc covariance file (format {meta.get('format')!r})")
        return f.get_tensor("C"), meta


# ---- tokens ------------------------------------------------------------------------------------------------------
def add_tokens(pipe, concepts: list[Concept]) -> None:
    """Add each concept's token with its embedding to the pipeline's tokenizer(s) and text encoder(s) (diffusers'
    textual-inversion loader; SDXL: the embedding is split at the first encoder's width, one part per encoder).
    Everything is checked first, so an error changes nothing."""
    parts = text_encoders(pipe)
    widths = [te.get_input_embeddings().weight.shape[-1] for te, _ in parts]
    seen = set()
    for c in concepts:
        for _, tok in parts:
            if c.token in tok.get_vocab() or len(tok(c.token, add_special_tokens=False).input_ids) == 1:  # "fox</w>"
                raise ValueError(f"concept token {c.token!r} is already in the tokenizer's vocabulary; choose a token "
                                 "the tokenizer does not know (e.g. '<my-concept>') or remove the loaded concept first")
        if c.token in seen:
            raise ValueError(f"two concepts use the token {c.token!r}; each concept needs its own token")
        if c.embedding.numel() != sum(widths):
            raise ConceptFileError(f"concept {c.token!r}: embedding of {c.embedding.numel()} values, the text "
                                   f"encoder's token embeddings have {' + '.join(map(str, widths))}")
        seen.add(c.token)
    for c in concepts:
        for (te, tok), part in zip(parts, c.embedding.reshape(-1).split(widths)):
            pipe.load_textual_inversion(part.to(te.dtype), token=c.token, tokenizer=tok, text_encoder=te)


def remove_tokens(pipe, tokens: list[str]) -> None:
    """Undo :func:`add_tokens` (tokens not present are skipped)."""
    for te, tok in text_encoders(pipe):
        present = [t for t in tokens if t in tok.get_vocab()]
        if present:
            pipe.unload_textual_inversion(present, tokenizer=tok, text_encoder=te)
