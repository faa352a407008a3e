"""In-memory tokenizers for the tiny offline pipelines (no files, no hub).

Each builder returns a real ``transformers`` tokenizer of the class the pipeline expects,
so ``save_pretrained`` / ``from_pretrained`` round-trips through ``tokenizer.json``.

Vocabularies are character level plus one token per word of :data:`WORDS`, so common prompt
words ("a red fox in the snow") are single tokens, as with the real tokenizers; any other text
still tokenizes (characters / byte fallback).
"""

from __future__ import annotations

import string

from tokenizers.pre_tokenizers import ByteLevel

# Words that get a token of their own (sorted, de-duplicated at use).
WORDS = (
    "a an the of in on at with and or to from by under over near behind "
    "red orange yellow green blue purple pink white black gray brown golden silver "
    "fox cat dog bird horse cow fish owl bear wolf deer rabbit lion tiger "
    "man woman person child girl boy people "
    "snow rain sun moon sky cloud clouds sea ocean beach river lake water forest tree trees "
    "flower flowers grass field mountain mountains hill city street road house castle room "
    "car bike boat train ship "
    "running walking sitting standing flying swimming jumping dancing "
    "small big tall old young dark bright light night day morning evening sunset sunrise "
    "photo painting portrait cinematic video drone shot close up wide view style "
    "is are"
).split()

# Characters every vocabulary covers one by one.
CHARS = string.ascii_letters + string.digits + string.punctuation


def _words(words=None) -> list[str]:
    seen: dict[str, None] = {}
    for w in WORDS if words is None else words:
        seen.setdefault(w, None)
    return list(seen)


def _chain_merges(word_pieces: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that glue each piece list into one token (adds the pieces to ``vocab``).

    BPE applies merges by rank, not left to right, so a word's own chain can be cut by an earlier word's merge
    ("r"+"e" of "red" inside "green"). Each word is therefore first split as the merges so far would split it,
    and those segments are chained; merges only ever go to the end, so earlier words keep their single token."""
    merges: list[tuple[str, str]] = []
    rank: dict[tuple[str, str], int] = {}
    for pieces in word_pieces:
        segments = _apply_merges(list(pieces), rank)
        cur = segments[0]
        for nxt in segments[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if pair not in rank:
                rank[pair] = len(merges)
                merges.append(pair)
            vocab.setdefault(cur, len(vocab))
    return merges


def _apply_merges(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """What byte-pair encoding makes of ``pieces`` with these merges: the best-ranked adjacent pair first."""
    while len(pieces) > 1:
        pairs = [(rank.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        ranked = [(r, i) for r, i in pairs if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def clip_tokenizer(model_max_length: int = 77, words=None):
    """A ``CLIPTokenizer`` (byte-level BPE with ``</w>`` word ends), 77 tokens like the real one.

    ``words``: the words that get a token of their own (default :data:`WORDS`)."""
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    pieces = []
    for w in _words(words):
        chars = list(w)
        chars[-1] = chars[-1] + "</w>"
        if len(chars) > 1:
            pieces.append(chars)
    merges = _chain_merges(pieces, vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length
    )


def t5_tokenizer(model_max_length: int = 512, words=None):
    """A ``T5Tokenizer`` (unigram, ``▁`` word starts): ``<pad>``=0, ``</s>``=1, ``<unk>``=2."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in CHARS]
    pieces += [("▁" + w, -1.0) for w in _words(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# Special tokens of the Llama-3 chat template HunyuanVideo's prompt template uses.
LLAMA_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama_tokenizer(model_max_length: int = 4096):
    """A ``LlamaTokenizer`` (metaspace BPE with byte fallback) that knows the chat-template specials."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    merges = _chain_merges([["▁", *w] for w in _words()], vocab)
    for tok in LLAMA_SPECIAL:
        vocab[tok] = len(vocab)
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<pad>",
        model_max_length=model_max_length,
        add_prefix_space=True,
    )
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIAL)})
    return tok


# Words of QwenImage's prompt template, so that its system prefix is 34 tokens exactly, as with
# the real Qwen2.5 tokenizer (the pipeline drops a hard-coded 34 tokens).
QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text "
    "spatial relationships of objects and background"
).split()
QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def qwen2_tokenizer(model_max_length: int = 4096):
    """A ``Qwen2Tokenizer`` (GPT-2 style byte-level BPE, ``Ġ`` word starts) with the chat specials."""
    from transformers import Qwen2Tokenizer

    space = "Ġ"  # byte-level image of " "
    vocab: dict[str, int] = {}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    words = list(dict.fromkeys([*_words(), *QWEN_TEMPLATE_WORDS]))
    pieces = [[space, *w] for w in words] + [list(w) for w in ("system", "user", "assistant", "Describe")]
    merges = _chain_merges(pieces, vocab)
    for tok in QWEN_SPECIAL:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    return tok
