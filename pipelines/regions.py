"""Pipeline-level helpers for region control (``maskmod``): masks, phrase → token positions, phrase embeddings.

* :func:`load_mask` reads a mask (image file, folder of frame images, video file, PIL image, array or tensor)
  into a float tensor ``[F, H, W]`` in [0, 1].
* :func:`text_token_spans` finds where each phrase of the prompt sits among the text tokens the denoiser
  attends to, with the pipeline's own tokenizer(s):

  ======== ==================================================== ==================================
  family   text tokens the denoiser sees                        positions of a phrase
  ======== ==================================================== ==================================
  unet     CLIP, 77 (SDXL: both CLIPs per position, same ids)   CLIP token positions (SOT = 0)
  sd3      77 CLIP tokens, then the T5 tokens                   CLIP positions ∪ 77 + T5 positions
  flux     T5 tokens only (the CLIP text is pooled)             T5 positions
  wan      UMT5 tokens                                          UMT5 positions
  cogvideox, ltx  T5 tokens                                     T5 positions
  ======== ==================================================== ==================================

* :func:`phrase_prompt_embeds` encodes the prompt, encodes each phrase alone and writes the phrase's
  embeddings into its span of the prompt's embedding (DenseDiffusion's segment-embedding substitution); it
  returns the keyword arguments to pass to the pipeline instead of ``prompt``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from attnproc.families import family_of
from attnproc.steer.phrases import covered_tokens, token_offsets
from attnproc.steer.regions import to_mask

__all__ = ["load_mask", "text_token_spans", "phrase_prompt_embeds", "phrase_char_span"]

_VIDEO_EXT = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_mask(source: Any) -> torch.Tensor:
    """A mask as float ``[F, H, W]`` in [0, 1]. ``source``: an image file (white / opaque = region), a folder
    of frame images (sorted by name), a video file (needs imageio), a PIL image, an array/tensor ``[H, W]`` or
    ``[F, H, W]``, or a list of per-frame items."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith(_IMAGE_EXT))
        if not files:
            raise ValueError(f"mask folder {os.fspath(source)!r} holds no image files")
        return to_mask([os.path.join(source, f) for f in files], f"mask folder {os.fspath(source)!r}")
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(_VIDEO_EXT):
        try:
            import imageio.v3 as iio
        except ImportError as e:  # pragma: no cover
            raise ValueError("reading a video mask needs imageio (pip install attnproc[video])") from e
        frames = torch.as_tensor(iio.imread(source)).float()  # [F, H, W, C] or [F, H, W]
        if frames.ndim == 4:
            frames = frames[..., :3].mean(-1)
        return (frames >= 127.5).float()
    return to_mask(source, "mask")


def phrase_char_span(prompt: str, phrase: str) -> tuple[int, int]:
    """The character range of ``phrase`` in ``prompt`` (first occurrence; case-insensitive fallback)."""
    phrase = phrase.strip()
    i = prompt.find(phrase)
    if i < 0:
        i = prompt.lower().find(phrase.lower())
    if i < 0:
        raise ValueError(f"phrase {phrase!r} is not in the prompt {prompt!r}; each region's phrase must be a part of "
                         "the full prompt")
    return i, i + len(phrase)


def _positions(tokenizer, prompt: str, phrase: str, max_length: int | None = None) -> list[int]:
    start, end = phrase_char_span(prompt, phrase)
    _, offsets = token_offsets(tokenizer, prompt, max_length)
    idx = covered_tokens(offsets, start, end)
    if not idx:
        raise ValueError(f"phrase {phrase!r} falls outside the {len(offsets)} tokens {type(tokenizer).__name__} keeps "
                         "of the prompt (truncated)")
    return idx


def _family(pipe) -> str:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return family_of(model).name
    raise ValueError(f"{type(pipe).__name__} has no denoiser (unet / transformer)")


def text_token_spans(pipe, prompt: str, phrases: list[str]) -> list[list[int]]:
    """For each phrase, the positions of its tokens among the text tokens the denoiser attends to."""
    family = _family(pipe)
    spans = []
    for phrase in phrases:
        if family == "unet":
            tok = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
            idx = _positions(tok, prompt, phrase, tok.model_max_length)
            tok2 = getattr(pipe, "tokenizer_2", None)
            if tok2 is not None and pipe.tokenizer is not None:
                if _positions(tok2, prompt, phrase, tok2.model_max_length) != idx:
                    raise ValueError(f"the two tokenizers of {type(pipe).__name__} place {phrase!r} differently; give "
                                     "'tokens' per region")
        elif family == "sd3":
            clip_len = getattr(pipe, "tokenizer_max_length", 77)
            idx = _positions(pipe.tokenizer, prompt, phrase, clip_len)
            if getattr(pipe, "tokenizer_3", None) is not None:
                idx += [clip_len + i for i in _positions(pipe.tokenizer_3, prompt, phrase)]
        elif family == "flux":
            idx = _positions(pipe.tokenizer_2, prompt, phrase)
        elif family in ("wan", "cogvideox", "ltx"):
            idx = _positions(pipe.tokenizer, prompt, phrase)
        else:
            raise ValueError(f"maskmod cannot locate phrase tokens for the {family} family yet (its text goes "
                             "through a prompt template); give 'tokens' per region")
        spans.append(idx)
    return spans


def _encode(pipe, family: str, text: str, max_sequence_length: int | None, device) -> dict[str, torch.Tensor]:
    """The conditional text embedding (and what the pipeline needs with it) for ``text``."""
    msl = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    with torch.no_grad():
        if family == "unet":
            if getattr(pipe, "text_encoder_2", None) is not None:
                pe, _, pooled, _ = pipe.encode_prompt(text, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
                return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
            pe, _ = pipe.encode_prompt(text, device, 1, False)
            return {"prompt_embeds": pe}
        if family == "sd3":
            pe, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, **msl)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        if family == "flux":
            pe, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device, **msl)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        if family in ("wan", "cogvideox"):
            pe, _ = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False, device=device, **msl)
            return {"prompt_embeds": pe}
        if family == "ltx":
            pe, mask, _, _ = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False, device=device, **msl)
            return {"prompt_embeds": pe, "prompt_attention_mask": mask}
    raise ValueError(f"phrase-embedding substitution is not supported for the {family} family")


def phrase_prompt_embeds(pipe, prompt: str, phrases: list[str], *, max_sequence_length: int | None = None,
                         device=None) -> dict[str, torch.Tensor]:
    """Encode ``prompt``, then overwrite each phrase's token span with the embedding of the phrase encoded alone.

    Returns the keyword arguments to call the pipeline with in place of ``prompt`` (``prompt_embeds`` and, where
    the pipeline needs them, ``pooled_prompt_embeds`` / ``prompt_attention_mask``; pooled embeddings stay those
    of the full prompt). Pass the same ``max_sequence_length`` as to the pipeline.
    """
    family = _family(pipe)
    device = device or getattr(pipe, "_execution_device", None) or "cpu"
    full = _encode(pipe, family, prompt, max_sequence_length, device)
    embeds = full["prompt_embeds"].clone()
    spans = text_token_spans(pipe, prompt, phrases)
    for phrase, span in zip(phrases, spans):
        alone = _encode(pipe, family, phrase.strip(), max_sequence_length, device)["prompt_embeds"]
        own = text_token_spans(pipe, phrase.strip(), [phrase])[0]
        if len(own) != len(span):
            raise ValueError(f"phrase {phrase!r} tokenizes to {len(own)} tokens alone but {len(span)} inside the "
                             "prompt; rephrase it so it splits at word boundaries")
        keep = [(d, s) for d, s in zip(span, own) if d < embeds.shape[1] and s < alone.shape[1]]
        if keep:
            dst, src = zip(*keep)
            embeds[:, list(dst)] = alone[:, list(src)].to(embeds.dtype)
    full["prompt_embeds"] = embeds
    return full
