"""Noun phrases of a prompt and their exact place among a tokenizer's tokens.

Edits that treat parts of a prompt on their own (``structured`` encodes each noun phrase alone) need two things
this module gives, independent of any model:

* the phrases, as character spans of the prompt: given by the user (:func:`locate_phrases`, each a whole-word
  part of the prompt, no two overlapping), found by a small rule-based chunker for English prompts
  (:func:`chunk_noun_phrases`, the default: nothing to download), or read from a constituency parse
  (:func:`tree_noun_phrases`, used by :func:`noun_phrases` when stanza or benepar is installed with its model);
* each phrase's token positions in the prompt and in the phrase encoded alone (:func:`align_phrase`), from the
  fast tokenizer's character offsets, with the token ids checked equal, so the alignment is exact for CLIP BPE
  and T5 sentencepiece or refused with a message saying why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Phrase", "locate_phrases", "chunk_noun_phrases", "tree_noun_phrases", "noun_phrases", "align_phrase",
           "token_offsets", "covered_tokens", "PARSERS"]

PARSERS = ("auto", "rules", "stanza", "benepar")


@dataclass(frozen=True)
class Phrase:
    """A part of the prompt: ``prompt[start:end] == text``."""

    text: str
    start: int
    end: int

    def overlaps(self, other: "Phrase") -> bool:
        return self.start < other.end and other.start < self.end


# ---------------------------------------------------------------------------------------------------------
def _whole_word(prompt: str, start: int, end: int) -> bool:
    before = prompt[start - 1] if start > 0 else " "
    after = prompt[end] if end < len(prompt) else " "
    return not (before.isalnum() or after.isalnum())


def locate_phrases(prompt: str, phrases) -> list[Phrase]:
    """The user's phrases as spans of ``prompt`` (case-insensitive, whole words), in the order given.

    A phrase that occurs several times takes its first occurrence not claimed by an earlier phrase (so the same
    words listed twice take two occurrences). Errors name the phrase: not in the prompt, or overlapping another."""
    if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)):
        raise ValueError(f"phrases must be a list of parts of the prompt, e.g. ['a red circle', 'a blue square'], "
                         f"got {phrases!r}")
    low = prompt.lower()
    found: list[Phrase] = []
    for p in phrases:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"phrases: each phrase must be a non-empty string, got {p!r}")
        text = p.strip()
        hits = [m.start() for m in re.finditer(re.escape(text.lower()), low)]
        hits = [i for i in hits if _whole_word(prompt, i, i + len(text))]
        if not hits:
            raise ValueError(f"phrase {text!r} is not in the prompt {prompt!r} (as whole words); each phrase must "
                             "be a part of the prompt")
        free = [i for i in hits if not any(Phrase(text, i, i + len(text)).overlaps(f) for f in found)]
        if not free:
            other = next(f for f in found if Phrase(text, hits[0], hits[0] + len(text)).overlaps(f))
            raise ValueError(f"phrases {other.text!r} and {text!r} overlap in the prompt {prompt!r}; give "
                             "non-overlapping phrases")
        i = free[0]
        found.append(Phrase(prompt[i:i + len(text)], i, i + len(text)))
    return found


# ---------------------------------------------------------------------------------------------------------
# The chunker's word classes (closed classes listed; anything else that is a word is a content word).
_DETERMINERS = set("a an the this that these those some any each every no another either neither my your his her "
                   "its our their one two three four five six seven eight nine ten several many few both".split())
_PREPOSITIONS = set("in on at with without under over above below beneath beside besides behind near next to from "
                    "of into onto by for across along around through between among against inside outside "
                    "toward towards upon within underneath atop past than like as".split())
_CONJUNCTIONS = set("and or but nor while".split())
_OTHER_CLOSED = set("is are was were be been being has have had do does did it they he she we you i them him "
                    "there here who which whose whom what where when very also not so too just then while".split())
_ADJECTIVES = set("red orange yellow green blue purple pink white black gray grey brown golden silver violet cyan "
                  "magenta beige small big large tiny huge tall short long old young new dark bright light pale "
                  "shiny wooden metal plastic glass round square striped dotted fluffy furry wet dry hot cold "
                  "happy sad cute pretty beautiful ugly empty full open closed".split())
_VERB_SUFFIXES = ("ing", "ed")


def _words(prompt: str):
    """(word, start, end) for every word (letters, digits, inner apostrophes/hyphens) and punctuation mark."""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]",
                                                                   prompt)]


def _closed(w: str) -> bool:
    return w in _PREPOSITIONS or w in _CONJUNCTIONS or w in _OTHER_CLOSED or not w[0].isalnum()


def _verbish(w: str) -> bool:
    return len(w) > 4 and w.endswith(_VERB_SUFFIXES) and w not in _ADJECTIVES


def chunk_noun_phrases(prompt: str) -> list[Phrase]:
    """Base noun phrases of an English prompt by rule: ``[determiner] modifier* noun`` with two words or more.

    A chunk starts at a determiner or a content word and runs over content words (anything not a preposition,
    conjunction, pronoun, auxiliary or punctuation mark). Inside a chunk, ``and``/``or``/``,`` between two
    listed adjectives joins them ("a red and blue ball"); elsewhere they end it ("a red circle and a blue square"
    gives two chunks). A word ending in -ing/-ed ends the chunk unless a content word follows it ("a running
    dog" is one chunk, "a dog running in the park" gives "a dog"). A determiner starts a new chunk. Chunks
    never overlap; one-word chunks are dropped (like the reference, which keeps noun phrases of two words or
    more)."""
    words = _words(prompt)
    low = [w.lower() for w, _, _ in words]
    chunks: list[tuple[int, int]] = []  # word index ranges [i, j)
    i, n = 0, len(words)
    while i < n:
        w = low[i]
        if _closed(w) or (_verbish(w) and not (i + 1 < n and not _closed(low[i + 1]) and low[i + 1] not in
                                                   _DETERMINERS)):
            i += 1
            continue
        j = i + 1 if w in _DETERMINERS else i
        while j < n:
            u = low[j]
            if u in _DETERMINERS:
                break
            if u in ("and", "or", ",") and j > i and low[j - 1] in _ADJECTIVES and j + 2 < n \
                    and low[j + 1] in _ADJECTIVES and not _closed(low[j + 2]):
                j += 2  # coordinated adjectives inside one chunk
                continue
            if _closed(u):
                break
            if _verbish(u) and j > i and not (j + 1 < n and not _closed(low[j + 1]) and low[j + 1] not in
                                             _DETERMINERS):
                break
            j += 1
        if j - i >= 2:
            chunks.append((i, j))
        i = max(j, i + 1)
    return [Phrase(prompt[words[a][1]:words[b - 1][2]], words[a][1], words[b - 1][2]) for a, b in chunks]


# ---------------------------------------------------------------------------------------------------------
def tree_noun_phrases(tree: str, prompt: str) -> list[Phrase]:
    """The lowest noun phrases of two words or more of a bracketed constituency parse (``(ROOT (NP (DT a) ...))``)
    as spans of ``prompt``. The leaves are found in the prompt left to right, so the spans are exact even with
    repeated words; nested noun phrases give the innermost ones (our phrases may not overlap)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", tree)
    stack: list[tuple[str, list[int]]] = []
    leaves: list[str] = []
    nps: list[tuple[int, int]] = []
    k = 0
    while k < len(tokens):
        t = tokens[k]
        if t == "(":
            label = tokens[k + 1]
            stack.append((label, [len(leaves), -1]))
            k += 2
            continue
        if t == ")":
            label, span = stack.pop()
            span[1] = len(leaves)
            if label == "NP" and span[1] - span[0] >= 2:
                nps.append((span[0], span[1]))
        else:
            leaves.append(t)
        k += 1
    pos, spans, low = 0, [], prompt.lower()
    for leaf in leaves:
        i = low.find(leaf.lower(), pos)
        if i < 0:
            raise ValueError(f"the parse's word {leaf!r} is not in the prompt {prompt!r} after position {pos}")
        spans.append((i, i + len(leaf)))
        pos = i + len(leaf)
    lowest = [(a, b) for a, b in nps if not any((c, d) != (a, b) and a <= c and d <= b for c, d in nps)]
    return [Phrase(prompt[spans[a][0]:spans[b - 1][1]], spans[a][0], spans[b - 1][1]) for a, b in sorted(lowest)]


def _stanza_tree(prompt: str) -> str:
    import stanza  # noqa: F401  (ImportError: not installed)

    nlp = stanza.Pipeline("en", processors="tokenize,pos,constituency", download_method=None, verbose=False)
    return str(nlp(prompt).sentences[0].constituency)


def _benepar_tree(prompt: str) -> str:
    import benepar

    parser = benepar.Parser("benepar_en3")
    return str(parser.parse([w for w, _, _ in _words(prompt)]))


def noun_phrases(prompt: str, parser: str = "auto") -> list[Phrase]:
    """The prompt's noun phrases: ``"rules"`` (the chunker), ``"stanza"``/``"benepar"`` (a constituency parser,
    which must be installed with its English model: nothing is downloaded), or ``"auto"`` (the first parser that
    is installed with its model, else the chunker)."""
    if parser not in PARSERS:
        raise ValueError(f"parser must be one of {', '.join(PARSERS)}, got {parser!r}")
    if parser == "rules":
        return chunk_noun_phrases(prompt)
    tried = {}
    for name, tree_of in (("stanza", _stanza_tree), ("benepar", _benepar_tree)):
        if parser not in ("auto", name):
            continue
        try:
            tree = tree_of(prompt)
        except Exception as e:  # not installed, or its model not downloaded
            tried[name] = f"{type(e).__name__}: {e}"
            continue
        return tree_noun_phrases(tree, prompt)
    if parser == "auto":
        return chunk_noun_phrases(prompt)
    raise ValueError(f"parser {parser!r} is not usable here ({tried[parser]}); install it with its English model "
                     "or use parser='rules'")


# ---------------------------------------------------------------------------------------------------------
def token_offsets(tokenizer, text: str, max_length: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens included) and each token's character range, from a fast tokenizer."""
    kwargs = dict(return_offsets_mapping=True, add_special_tokens=True)
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    try:
        enc = tokenizer(text, **kwargs)
    except NotImplementedError as e:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets (a slow tokenizer?); finding a "
                         "phrase's tokens needs a fast tokenizer (or give the token positions)") from e
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def covered_tokens(offsets, start: int, end: int) -> list[int]:
    """Positions of the tokens whose character range meets ``[start, end)``."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def align_phrase(tokenizer, prompt: str, phrase: Phrase, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """``(in_prompt, alone)``: the positions of ``phrase``'s tokens in the tokenized prompt and in the phrase
    tokenized on its own (special tokens included in the positions, e.g. CLIP's start token is 0).

    Exact: the two position lists have equal length and the same token ids, and every token is wholly inside
    the phrase; otherwise a ``ValueError`` says why (a word the tokenizer splits differently in context, a
    phrase cut off by ``max_length``)."""
    ids, offsets = token_offsets(tokenizer, prompt, max_length)
    inside = covered_tokens(offsets, phrase.start, phrase.end)
    if not inside:
        raise ValueError(f"phrase {phrase.text!r} falls outside the {len(ids)} tokens {type(tokenizer).__name__} "
                         f"keeps of the prompt (truncated at {max_length})")
    a, b = offsets[inside[0]][0], offsets[inside[-1]][1]
    if a < phrase.start or b > phrase.end:
        raise ValueError(f"phrase {phrase.text!r}: {type(tokenizer).__name__} joins its edge with the text around "
                         f"it (tokens span {prompt[a:b]!r}); choose a phrase that ends at a token boundary")
    alone_ids, alone_off = token_offsets(tokenizer, phrase.text, max_length)
    own = covered_tokens(alone_off, 0, len(phrase.text))
    if [ids[i] for i in inside] != [alone_ids[i] for i in own]:
        got = tokenizer.convert_ids_to_tokens([ids[i] for i in inside])
        alone = tokenizer.convert_ids_to_tokens([alone_ids[i] for i in own])
        raise ValueError(f"phrase {phrase.text!r} tokenizes differently inside the prompt ({got}) and alone "
                         f"({alone}) with {type(tokenizer).__name__}; put spaces around it")
    return inside, own
