"""Key-locking (Perfusion, Tewel et al. 2023): gated rank-1 edits of every cross-attention K and V projection.

For a text encoding ``e`` (one token of the processor's ``encoder_hidden_states``), a projection ``W`` (``to_k``
or ``to_v``) and concepts ``c`` with input ``i*_c`` and target output ``o*_c``::

    sim_c(e) = eᵀ C⁻¹ i*_c / (i*_cᵀ C⁻¹ i*_c)
    out(e)   = W·(e − P e) + Σ_c σ((sim_c(e) − β_c)/τ_c) · o*_c

``P e`` is the projection of ``e`` onto span{i*_c} in the C⁻¹ metric: exactly, through the Cholesky factor of
C⁻¹ and a QR in that metric (``multi="exact"``), or per concept, ``Σ_c sim_c(e)·i*_c`` (``multi="approx"``); for
one concept both are ``sim(e)·i*``. With the sigmoid replaced by ``sim`` itself this is the ROME rank-1 edit
``W' = W + (o* − W i*)(C⁻¹ i*)ᵀ / (i*ᵀ C⁻¹ i*)``. Keys are locked: ``o*_K = W_K e_super`` (the superclass word's
encoding); values ``o*_V`` are learned (``attnproc train-concept``). The concept's token must be in the prompt;
``apply`` adds it to the tokenizer and text encoder and ``remove`` takes it out again.

    attnproc.apply(pipe, "keylock", concepts=["flag.safetensors"], covariance="clip-C.safetensors")
    pipe("a <flag> and a blue circle")
    attnproc.apply(pipe, ["radial", "keylock"], keylock={...})           # composes with a sparse base

Concept files and the covariance file: :mod:`attnproc.pipelines.concepts`; docs/perfusion.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..method import Edit, Method
from ..options import OptionError, option
from ..registry import register
from ..site import Site

__all__ = ["similarity", "gate", "projection_basis", "keylock_linear", "mixed_key_linear", "KeyLock", "KeyLockConfig",
           "KeyLockState"]

BETA_RANGE = (0.0, 1.5)
TAU_RANGE = (0.01, 1.0)


# ---- the formula ---------------------------------------------------------------------------------------------
def similarity(e: torch.Tensor, i_stars: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """``sim_c(e) = eᵀC⁻¹i*_c / (i*_cᵀC⁻¹i*_c)`` for ``e [..., d]``, ``i_stars [n, d]``: ``[..., n]``."""
    ci = i_stars @ c_inv  # [n, d] (C⁻¹ is symmetric)
    energy = (ci * i_stars).sum(-1)
    return (e @ ci.t()) / energy


def gate(sim: torch.Tensor, beta, tau) -> torch.Tensor:
    """``σ((sim − β)/τ)``; ``beta``/``tau`` numbers or ``[n]`` tensors broadcasting over the last dim."""
    return torch.sigmoid((sim - beta) / tau)


def projection_basis(i_stars: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """A C⁻¹-orthonormal basis ``U [d, n]`` of span{i*_c} (``UᵀC⁻¹U = I``): with ``C⁻¹ = L Lᵀ`` (Cholesky),
    ``Lᵀ I = Q R`` (QR), ``U = L⁻ᵀ Q``. The projection onto the span in that metric is ``U Uᵀ C⁻¹ e``."""
    lower = torch.linalg.cholesky(c_inv)
    q, _ = torch.linalg.qr(lower.t() @ i_stars.t())
    return torch.linalg.solve_triangular(lower.t(), q, upper=True)


def keylock_linear(e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, i_stars: torch.Tensor,
                   outputs: torch.Tensor, c_inv: torch.Tensor, beta, tau, *, multi: str = "exact",
                   basis: torch.Tensor | None = None) -> torch.Tensor:
    """``out(e) = W·(e − P e) + b + Σ_c σ((sim_c(e) − β_c)/τ_c)·o*_c`` for ``e [..., d]``; ``outputs [n, d_out]``.

    ``multi``: ``"exact"`` (projection onto the span in the C⁻¹ metric; ``basis`` from :func:`projection_basis`
    may be passed precomputed) or ``"approx"`` (``Σ_c sim_c(e)·i*_c``)."""
    sims = similarity(e, i_stars, c_inv)
    if multi == "approx" or i_stars.shape[0] == 1:
        along = sims @ i_stars
    else:
        u = projection_basis(i_stars, c_inv) if basis is None else basis
        along = (e @ (c_inv @ u)) @ u.t()
    return F.linear(e - along, weight, bias) + gate(sims, beta, tau) @ outputs


def mixed_key_linear(e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, i_stars: torch.Tensor,
                     outputs: torch.Tensor, c_inv: torch.Tensor, beta, tau) -> torch.Tensor:
    """``keys="mixed"``: ``(W e + b + Σ_c g_c o*_K,c) / (1 + Σ_c g_c)`` with ``g_c = σ((sim_c(e) − β_c)/τ_c)``.

    Not Perfusion's lock: a concept token keeps its own key, averaged with its superclass key in proportion to the
    gate (a token equal to ``i*`` at the inference defaults: 0.53 own, 0.47 superclass); a token no concept resembles
    keeps ≈ ``W e + b`` (its gates are ≈ 0, not 0). Why: a concept trained with its embedding keeps most of its look in the embedding, which a
    second concept in one prompt passes on only through its own key; locked, it takes the first one's look
    (measured on the shapes model: docs/perfusion.md, "Two concepts in one prompt")."""
    gates = gate(similarity(e, i_stars, c_inv), beta, tau)
    return (F.linear(e, weight, bias) + gates @ outputs) / (1 + gates.sum(-1, keepdim=True))


# ---- options -------------------------------------------------------------------------------------------------
@dataclass
class KeyLockConfig:
    concepts: Any = option(None, help="concept files: a list of paths or {'file': path, 'beta': b, 'tau': t} "
                                      "(β/τ per concept), or Concept objects")
    covariance: Any = option(None, help="the text encoder's covariance file (attnproc keylock-covariance), "
                                        "shared by all its concepts")
    beta: float | None = option(None, low=BETA_RANGE[0], high=BETA_RANGE[1],
                                help="gate bias β for every concept without its own (None: the file's, 0.7)")
    tau: float | None = option(None, low=TAU_RANGE[0], high=TAU_RANGE[1],
                               help="gate temperature τ for every concept without its own (None: the file's, 0.15)")
    multi: str = option("exact", choices=("exact", "approx"),
                        help="several concepts: exact projection (Cholesky + QR in the C⁻¹ metric) or per concept")
    locking: str = option("local", choices=("local", "global"),
                          help="local: the edit's keys come from the prompt; global: every key of a prompt with a "
                               "concept comes from the same prompt with each concept word replaced by its superclass")
    keys: str = option("locked", choices=("locked", "mixed"),
                       help="locked: Perfusion's keys, W_K(e − P e) + Σ g·o*_K; mixed: each token keeps its own key, "
                            "averaged with the gated superclass keys, (W_K e + Σ g·o*_K)/(1 + Σ g) (not the paper; "
                            "lets a second concept in one prompt keep its own look, docs/perfusion.md)")
    lock_keys: bool = option(True, help="keys locked to the superclass (Perfusion); False makes o*_K trainable "
                                        "too (the no-key-locking ablation; only matters when training)")

    def validate(self):
        entries(self.concepts)
        if self.keys == "mixed" and self.locking == "global":
            raise ValueError("option 'keys'='mixed' needs locking='local': global locking takes every key from the "
                             "superclass prompt, so no token could keep its own key")
        if self.covariance is None:
            raise ValueError("option 'covariance' is required: the text encoder's covariance C (estimate it once "
                             "with `attnproc keylock-covariance`)")


def _check_range(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def entries(concepts) -> list[dict]:
    """The ``concepts`` option as ``[{'source': path or Concept, 'beta': b or None, 'tau': t or None}]``."""
    if concepts is None or (isinstance(concepts, (list, tuple)) and not concepts):
        raise ValueError("option 'concepts' is required: a list of concept files (attnproc train-concept writes them)")
    if not isinstance(concepts, (list, tuple)):
        concepts = [concepts]
    out = []
    for i, item in enumerate(concepts):
        where = f"concepts[{i}]"
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"file", "beta", "tau"})
            if unknown or "file" not in item:
                raise ValueError(f"{where} must be a path or {{'file': path, 'beta': b, 'tau': t}}, got keys "
                                 f"{sorted(item)}")
            beta, tau = item.get("beta"), item.get("tau")
            if beta is not None:
                beta = _check_range(beta, f"{where}.beta", *BETA_RANGE)
            if tau is not None:
                tau = _check_range(tau, f"{where}.tau", *TAU_RANGE)
            out.append({"source": item["file"], "beta": beta, "tau": tau})
        elif isinstance(item, (str, os.PathLike)) or hasattr(item, "i_star"):
            out.append({"source": item, "beta": None, "tau": None})
        else:
            raise ValueError(f"{where} must be a concept file path, {{'file': ..., 'beta': ...}} or a Concept, got "
                             f"{type(item).__name__}")
    return out


# ---- global locking: the superclass encoding of each prompt ------------------------------------------------------
class _SuperclassHook:
    """Forward hook of one text encoder (torch's public hook API): when the input ids hold a concept token, encode
    them once more with each concept token swapped for its superclass token and append ``(encoding, superclass
    encoding)`` of every prompt to ``records`` (the last 128 kept). Both encodings are taken as the diffusers
    pipeline takes the denoiser's context from this call, ``clip_skip`` (``clip_skip()``: the pipeline's, for this
    call) included: SD 1.x/2.x (``penultimate=False``) the output's first field, and with ``clip_skip`` k the
    hidden state ``-(k + 1)`` through the encoder's final layer norm; SDXL's two encoders (``penultimate=True``)
    the hidden state ``-2``, and with ``clip_skip`` k ``-(k + 2)``, no layer norm."""

    KEEP = 128

    def __init__(self, swap: dict[int, int], records: list, *, penultimate: bool, clip_skip=lambda: None):
        self.swap, self.records, self.penultimate, self.clip_skip = swap, records, penultimate, clip_skip

    def _encodings(self, module, output) -> list:
        """The contexts the pipeline may take from this call: the one ``clip_skip`` picks and, when that is another
        layer, the default one too (SDXL encodes its negative prompt at the penultimate layer whatever the
        ``clip_skip``; a direct ``encode_prompt`` call may not pass the pipeline's). Pairing is by exact equality,
        so an extra candidate never matches the wrong prompt."""
        hidden = getattr(output, "hidden_states", None)
        skip = self.clip_skip()
        skip = skip if isinstance(skip, int) and not isinstance(skip, bool) else None  # else the default layer
        if not self.penultimate:
            found = [output[0]]
            if skip is not None and hidden is not None:  # the pipeline asks for hidden states only with clip_skip
                # diffusers reads ``text_encoder.text_model.final_layer_norm``; transformers >= 5.6 flattened
                # CLIPTextModel (no ``text_model``; that diffusers line then fails, diffusers issue #14124)
                found.append(getattr(module, "text_model", module).final_layer_norm(hidden[-(skip + 1)]))
            return found
        if hidden is None:  # called without the hidden states the denoiser would get: nothing to pair
            return []
        return [hidden[-2]] + ([hidden[-(skip + 2)]] if skip else [])

    def __call__(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or not any(bool((ids == t).any()) for t in self.swap):
            return None
        own = self._encodings(module, output)
        if not own:
            return None
        plain = ids.clone()
        for t, sup in self.swap.items():
            plain[ids == t] = sup
        with torch.no_grad():
            rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
            other = self._encodings(module, module(plain, *args[1:], **rest))
        for mine, theirs in zip(own, other):
            self.records.extend(zip(mine.detach(), theirs))
        del self.records[:-self.KEEP]
        return None


# ---- per-module state ----------------------------------------------------------------------------------------
class KeyLockState(torch.nn.Module):
    """One cross-attention module's targets: ``o_k [n, d_k]`` (locked: a buffer, never trained) and ``o_v [n, d_v]``
    (the learned values: parameters). ``o_k`` becomes a parameter only for the no-key-locking ablation."""

    def __init__(self, o_k: torch.Tensor, o_v: torch.Tensor, *, train_keys: bool = False):
        super().__init__()
        if train_keys:
            self.o_k = torch.nn.Parameter(o_k.clone())
        else:
            self.register_buffer("o_k", o_k.clone())
        self.o_v = torch.nn.Parameter(o_v.clone())


# ---- the edit ------------------------------------------------------------------------------------------------
@register
class KeyLock(Edit):
    """Perfusion's key-locked gated rank-1 edit of the cross-attention keys and values."""

    name = "keylock"
    summary = "Personalised concepts (Perfusion): key-locked gated rank-1 edits of cross-attention K and V."
    Config = KeyLockConfig
    families = ("unet",)

    def __init__(self, config=None):
        super().__init__(config)
        from attnproc.pipelines.concepts import ConceptFileError, load_concept, load_covariance

        parsed = entries(self.config.concepts)
        self.concepts = []
        for i, ent in enumerate(parsed):
            src = ent["source"]
            try:
                self.concepts.append(load_concept(src) if isinstance(src, (str, os.PathLike)) else src)
            except ConceptFileError as e:
                raise OptionError(f"method 'keylock': concepts[{i}]: {e}") from None
        cov = self.config.covariance
        if isinstance(cov, torch.Tensor):
            c, meta = cov, {}
        else:
            try:
                c, meta = load_covariance(cov)
            except ConceptFileError as e:
                raise OptionError(f"method 'keylock': option 'covariance': {e}") from None
        self.covariance_encoder = meta.get("text_encoder", "")
        width = self.concepts[0].i_star.numel()
        if c.shape != (width, width):
            raise OptionError(f"method 'keylock': the covariance is {tuple(c.shape)}, the concepts' encodings have "
                              f"{width} values; use the covariance of the concepts' text encoder")
        for i, con in enumerate(self.concepts):
            if self.covariance_encoder and con.text_encoder and con.text_encoder != self.covariance_encoder:
                raise OptionError(f"method 'keylock': concepts[{i}] ({con.token!r}) was trained with another text "
                                  f"encoder than the covariance file's ({con.text_encoder} vs "
                                  f"{self.covariance_encoder}); every concept must share its encoder's C")
        self.c_inv = torch.linalg.inv(c.double()).float()
        # β/τ per concept: its entry's, else the option's, else the file's
        self.betas = torch.tensor([next(x for x in (e["beta"], self.config.beta, con.beta) if x is not None)
                                   for e, con in zip(parsed, self.concepts)])
        self.taus = torch.tensor([next(x for x in (e["tau"], self.config.tau, con.tau) if x is not None)
                                  for e, con in zip(parsed, self.concepts)])
        self._added: list[str] = []
        self._hooks: list = []
        self._widths: list[int] = []  # global locking: each text encoder's width in the context
        self._super: list[list] = []  # per text encoder: (encoding, superclass encoding) of recent prompts

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]

    def i_stars(self) -> torch.Tensor:
        """``[n, d]``: the concepts' inputs (training updates ``concept.i_star`` in place, an EMA)."""
        return torch.stack([c.i_star.reshape(-1) for c in self.concepts])

    # ---- binding: compatibility and the new tokens ------------------------------------------------------
    def bind(self, target) -> None:
        super().bind(target)
        from attnproc.pipelines.concepts import add_tokens, cross_attention_modules, model_fingerprint, \
            text_fingerprint

        denoiser = target if isinstance(target, torch.nn.Module) else getattr(target, "unet", None)
        if denoiser is not None:
            fp = model_fingerprint(denoiser)
            names = [n for n, _ in cross_attention_modules(denoiser)]
            for i, c in enumerate(self.concepts):
                if c.model and c.model != fp:
                    raise UnsupportedModelError(
                        f"concept {c.token!r} (concepts[{i}]) was trained on another model (fingerprint {c.model}, "
                        f"this pipeline's denoiser is {fp}); retrain it for this model")
                if list(c.values) != names:
                    raise UnsupportedModelError(
                        f"concept {c.token!r} (concepts[{i}]) has targets for {len(c.values)} cross-attention "
                        f"modules, this denoiser has {len(names)} ({names[:2]}...); it is for another architecture")
        if isinstance(target, torch.nn.Module):
            return  # a bare denoiser: the caller feeds encodings that already hold the concepts
        if getattr(target, "text_encoder", None) is not None and getattr(target, "tokenizer", None) is not None:
            fp = text_fingerprint(target)
            if self.covariance_encoder and self.covariance_encoder != fp:
                raise UnsupportedModelError(f"the covariance file is for another text encoder ({self.covariance_encoder}, "
                                            f"this pipeline's is {fp}); estimate C for this one")
            for i, c in enumerate(self.concepts):
                if c.text_encoder and c.text_encoder != fp:
                    raise UnsupportedModelError(f"concept {c.token!r} (concepts[{i}]) was trained with another text "
                                                f"encoder ({c.text_encoder}, this pipeline's is {fp})")
        new = [c for c in self.concepts if c.embedding is not None and c.embedding.numel()]
        supers = self._superclass_ids(target) if self.config.locking == "global" else None  # may refuse: before any token
        add_tokens(target, new)  # checks every token first: an error adds none
        self._added = [c.token for c in new]
        if supers is not None:
            self._watch_encoder(target, supers)

    def _superclass_ids(self, pipe) -> list[list[int]]:
        """Global locking: each concept's superclass token id in each text encoder's tokenizer (one token each)."""
        from attnproc.pipelines.concepts import superclass_id, text_encoders

        ids = []
        for _, tok in text_encoders(pipe):
            row = []
            for i, c in enumerate(self.concepts):
                try:
                    row.append(superclass_id(pipe, c.superclass, tok))
                except ValueError as exc:
                    raise ValueError(f"concepts[{i}].superclass (locking='global'): {exc}") from None
            ids.append(row)
        return ids

    def _watch_encoder(self, pipe, supers: list[list[int]]) -> None:
        """Global locking: a forward hook on each text encoder encodes every prompt holding a concept token once
        more with the superclass words in its place and keeps both encodings as the denoiser sees them (SD 1.x/2.x:
        the output; SDXL: the penultimate hidden state of each encoder, concatenated per position by the pipeline;
        with the layer the pipeline's ``clip_skip`` picks for this call: :class:`_SuperclassHook`). The edit finds
        the superclass encoding by the prompt's own, one encoder's slice of the context at a time."""
        from attnproc.pipelines.concepts import text_encoders

        parts = text_encoders(pipe)
        self._widths = [int(te.config.hidden_size) for te, _ in parts]
        self._super = [[] for _ in parts]
        self._hooks = []
        for n, (encoder, tok) in enumerate(parts):
            swap = {tok.convert_tokens_to_ids(c.token): sid for c, sid in zip(self.concepts, supers[n])}
            hook = _SuperclassHook(swap, self._super[n], penultimate=len(parts) > 1,
                                   clip_skip=lambda: getattr(pipe, "clip_skip", None))
            self._hooks.append(encoder.register_forward_hook(hook, with_kwargs=True))

    def superclass_context(self, e: torch.Tensor) -> torch.Tensor:
        """Global locking: ``e [B, L, d]`` with each row that encodes a prompt holding a concept replaced by the
        encoding of that prompt with the superclass words (per text encoder's slice of the row; slices and rows
        without a concept stay as they are)."""
        if sum(self._widths) != e.shape[-1]:
            return e
        rows = []
        for row in e:
            pieces = []
            for part, records in zip(row.split(self._widths, dim=-1), self._super):
                match = next((sup for enc, sup in reversed(records)
                              if enc.shape == part.shape and torch.equal(enc.to(part.dtype), part)), None)
                pieces.append(part if match is None else match.to(part))
            rows.append(torch.cat(pieces, dim=-1))
        return torch.stack(rows)

    def unbind(self, target) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._super, self._widths = [], [], []
        if self._added and not isinstance(target, torch.nn.Module):
            from attnproc.pipelines.concepts import remove_tokens

            remove_tokens(target, self._added)
        self._added = []

    def create_state(self, site: Site) -> torch.nn.Module | None:
        if site.kind != "cross":
            return None
        missing = [c.token for c in self.concepts if site.name not in c.values]
        if missing:
            raise UnsupportedModelError(f"concept(s) {missing} have no targets for the cross-attention module "
                                        f"{site.name!r}: they were trained for another model")
        o_k = torch.stack([c.keys[site.name].reshape(-1).float() for c in self.concepts])
        o_v = torch.stack([c.values[site.name].reshape(-1).float() for c in self.concepts])
        w = site.module.to_k.weight if site.module is not None else None
        if w is not None and (o_k.shape[-1] != w.shape[0] or o_v.shape[-1] != site.module.to_v.weight.shape[0]):
            raise UnsupportedModelError(f"the concepts' targets for {site.name!r} have sizes {o_k.shape[-1]}/"
                                        f"{o_v.shape[-1]}, the module projects to {w.shape[0]}: another model")
        state = KeyLockState(o_k, o_v, train_keys=not self.config.lock_keys)
        return state.to(w.device) if w is not None else state

    def edit(self, q, k, v, site, *, inner: Method, attn_mask=None, scale=None):
        state = self.module_state(site)
        e = site.inputs.encoder_hidden_states if site.inputs is not None else None
        if site.kind != "cross" or state is None or e is None:
            return inner.attention(q, k, v, site, attn_mask=attn_mask, scale=scale)
        attn = site.module
        if getattr(attn, "norm_cross", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise UnsupportedModelError(f"keylock: {site.name} normalises its text context or keys; only plain "
                                        "cross-attention projections (SD 1.x/2.x and SDXL UNets) are supported")
        key_context = self.superclass_context(e) if self.config.locking == "global" else e
        new_k = self.project_keys(key_context, attn.to_k, state.o_k)
        new_v = self.project(e, attn.to_v, state.o_v)
        heads = k.shape[1]
        new_k = new_k.view(e.shape[0], -1, heads, k.shape[-1]).transpose(1, 2).to(k.dtype)
        new_v = new_v.view(e.shape[0], -1, heads, v.shape[-1]).transpose(1, 2).to(v.dtype)
        if new_k.shape != k.shape or new_v.shape != v.shape:
            raise UnsupportedModelError(f"keylock: recomputed keys {tuple(new_k.shape)} do not match the stock "
                                        f"processor's {tuple(k.shape)} at {site.name}")
        return inner.attention(q, new_k, new_v, site, attn_mask=attn_mask, scale=scale)

    def project_keys(self, e: torch.Tensor, linear: torch.nn.Linear, outputs: torch.Tensor) -> torch.Tensor:
        """The edited keys of ``e`` in the form the ``keys`` option asks for (``to_k`` and ``o*_K``)."""
        return self.project(e, linear, outputs, mixed=self.config.keys == "mixed")

    def project(self, e: torch.Tensor, linear: torch.nn.Linear, outputs: torch.Tensor, *,
                mixed: bool = False) -> torch.Tensor:
        """The edited projection of ``e [B, S, d]`` (fp32 math, as the reference implementations); ``mixed``: the
        ``keys="mixed"`` form (:func:`mixed_key_linear`)."""
        dev = e.device
        args = (e.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float(),
                self.i_stars().to(dev, torch.float32), outputs.float(), self.c_inv.to(dev), self.betas.to(dev),
                self.taus.to(dev))
        out = mixed_key_linear(*args) if mixed else keylock_linear(*args, multi=self.config.multi)
        return out.to(e.dtype)
