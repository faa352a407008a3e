"""Noun phrases of a prompt (given, chunked, parsed) and their exact token alignment (CLIP BPE, T5 sentencepiece)."""
import pytest

from attnproc.pipelines._tokenizers import clip_tokenizer, t5_tokenizer
from attnproc.steer.phrases import (Phrase, align_phrase, chunk_noun_phrases, locate_phrases, noun_phrases,
                                    tree_noun_phrases)


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle and a blue square", ["a red circle", "a blue square"]),
    ("A photo of a red circle, next to a blue square.", ["A photo", "a red circle", "a blue square"]),
    ("a red and blue ball on a wooden table", ["a red and blue ball", "a wooden table"]),
    ("a dog running in the park", ["a dog", "the park"]),
    ("a running dog", ["a running dog"]),
    ("two yellow triangles above a green circle and a red square",
     ["two yellow triangles", "a green circle", "a red square"]),
    ("a man riding a horse", ["a man", "a horse"]),
    ("a red circle and a red circle", ["a red circle", "a red circle"]),
    ("circle", []),
])
def test_chunker(prompt, expected):
    found = chunk_noun_phrases(prompt)
    assert [p.text for p in found] == expected
    assert all(prompt[p.start:p.end] == p.text for p in found)
    assert all(not a.overlaps(b) for i, a in enumerate(found) for b in found[i + 1:])


def test_repeated_words_get_their_own_occurrence():
    prompt = "a red circle and a red circle"
    chunks = chunk_noun_phrases(prompt)
    assert [(p.start, p.end) for p in chunks] == [(0, 12), (17, 29)]
    given = locate_phrases(prompt, ["a red circle", "a red circle"])
    assert [(p.start, p.end) for p in given] == [(0, 12), (17, 29)]
    assert locate_phrases("A Red Circle and a blue square", ["a red circle"]) == [Phrase("A Red Circle", 0, 12)]


@pytest.mark.parametrize("phrases, message", [
    (["a green circle"], "'a green circle' is not in the prompt"),
    (["red circ"], "'red circ' is not in the prompt"),  # not whole words
    (["a red circle", "circle and a"], "phrases 'a red circle' and 'circle and a' overlap"),
    (["a red circle", "a red circle"], "overlap"),  # only one occurrence to give
    ("a red circle", "must be a list"),
    ([""], "non-empty string"),
])
def test_locate_phrases_errors(phrases, message):
    with pytest.raises(ValueError, match=message):
        locate_phrases("a red circle and a blue square", phrases)


def test_tree_noun_phrases_takes_the_lowest_nps_exactly():
    prompt = "a red circle, and a red square."
    tree = ("(ROOT (NP (NP (DT a) (JJ red) (NN circle)) (, ,) (CC and) (NP (DT a) (JJ red) (NN square)) (. .)))")
    assert tree_noun_phrases(tree, prompt) == [Phrase("a red circle", 0, 12), Phrase("a red square", 18, 30)]
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        tree_noun_phrases("(NP (DT a) (NN cat))", prompt)


def test_parser_choice():
    # stanza / benepar are optional; without them (as here) 'auto' is the chunker and asking for one is refused
    try:
        import stanza  # noqa: F401
        has_parser = True
    except ImportError:
        try:
            import benepar  # noqa: F401
            has_parser = True
        except ImportError:
            has_parser = False
    prompt = "a red circle and a blue square"
    assert noun_phrases(prompt, "rules") == chunk_noun_phrases(prompt)
    if not has_parser:
        assert noun_phrases(prompt, "auto") == chunk_noun_phrases(prompt)
        with pytest.raises(ValueError, match="parser 'stanza' is not usable here"):
            noun_phrases(prompt, "stanza")
    with pytest.raises(ValueError, match="parser must be one of auto, rules, stanza, benepar"):
        noun_phrases(prompt, "spacy")


# ---- alignment: CLIP BPE (start token at 0, '</w>' word ends, punctuation split off) -----------------------
def _tokens(tok, prompt, positions):
    ids = tok(prompt)["input_ids"]
    return tok.convert_ids_to_tokens([ids[i] for i in positions])


def test_clip_alignment_punctuation_repeats_and_multi_token_words():
    tok = clip_tokenizer()
    prompt = "a red circle, and a red rhombus!"
    first, second = locate_phrases(prompt, ["a red circle", "a red rhombus"])
    # tokens: <sot> a red ci r cl e</w> ,</w> and a red r ho m b u s</w> !</w> <eot>
    inside, alone = align_phrase(tok, prompt, first)
    assert inside == [1, 2, 3, 4, 5, 6] and alone == [1, 2, 3, 4, 5, 6]
    inside, alone = align_phrase(tok, prompt, second)
    assert inside == [9, 10, 11, 12, 13, 14, 15, 16] and alone == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _tokens(tok, prompt, inside) == ["a</w>", "red</w>", "r", "ho", "m", "b", "u", "s</w>"]
    assert _tokens(tok, "a red rhombus", alone) == _tokens(tok, prompt, inside)


def test_t5_alignment_multi_token_words_and_repeats():
    tok = t5_tokenizer()
    prompt = "a red circle, and a red rhombus!"
    first, second = locate_phrases(prompt, ["a red circle", "a red rhombus"])
    inside, alone = align_phrase(tok, prompt, first)  # no start token: ▁a ▁red ▁ c i r c l e
    assert inside == list(range(9)) and alone == list(range(9))
    inside, alone = align_phrase(tok, prompt, second)  # , ▁and, then ▁a ▁red ▁ r h o m b u s
    assert inside == list(range(11, 21)) and alone == list(range(10))
    assert _tokens(tok, prompt, inside)[:3] == ["▁a", "▁red", "▁"]


def test_alignment_refuses_what_is_not_exact():
    t5 = t5_tokenizer()
    prompt = "red,blue square"  # 'blue' follows a comma without a space: no ▁ inside the prompt, one alone
    with pytest.raises(ValueError, match="tokenizes differently inside the prompt"):
        align_phrase(t5, prompt, locate_phrases(prompt, ["blue square"])[0])
    clip = clip_tokenizer(model_max_length=5)
    prompt = "a red circle and a blue square"
    with pytest.raises(ValueError, match="falls outside the 5 tokens"):
        align_phrase(clip, prompt, locate_phrases(prompt, ["a blue square"])[0], max_length=5)
