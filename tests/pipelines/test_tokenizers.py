"""The in-memory tokenizers give each vocabulary word one token, as their docstrings promise."""
from attnproc.pipelines._tokenizers import _words, clip_tokenizer, llama_tokenizer, t5_tokenizer
from attnproc.pipelines.shapes import WORDS


def test_every_word_is_one_clip_token_even_where_an_earlier_words_merge_cuts_its_chain():
    # "green" holds "re" (merged early for "red"), "triangle" holds "ri"/"an": plain left-to-right chains broke them.
    for words in (None, WORDS):
        tok = clip_tokenizer(words=words)
        split = {w: tok.tokenize(w) for w in _words(words) if len(tok.tokenize(w)) != 1}
        assert split == {}
    assert clip_tokenizer(words=WORDS).tokenize("a green triangle") == ["a</w>", "green</w>", "triangle</w>"]


def test_llama_and_t5_words_are_one_token():
    llama, t5 = llama_tokenizer(), t5_tokenizer()
    assert all(len(llama.tokenize(w)) == 1 for w in _words())
    assert all(len(t5.tokenize(w)) == 1 for w in _words())
