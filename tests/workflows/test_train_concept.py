"""``attnproc train-concept`` and ``attnproc keylock-covariance``: a tiny smoke training that learns o*_V and the
embedding (keys locked), resume = uninterrupted, masks weight the loss, config errors by field, the CLI."""
from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from PIL import Image

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.processor import AttnProcessor
from attnproc.pipelines import tiny_pipeline
from attnproc.workflows.cli import main as cli_main
from attnproc.workflows.train_concept import ConceptConfigError, ConceptConfig, parse_concept_config, train_concept


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    for i in range(4):
        a = np.full((64, 64, 3), 200, np.uint8)
        a[16:48, 16 + i:32 + i] = (220, 30, 30)
        a[16:48, 32 + i:48] = (230, 200, 40)
        Image.fromarray(a).save(root / "img" / f"{i}.png")
        m = np.zeros((64, 64), np.uint8)
        m[16:48, 16:48] = 255
        Image.fromarray(m).save(root / "mask" / f"{i}.png")
    (root / "captions.txt").write_text("a red fox in the snow\na fox\n\nthe snow is white\n")
    assert cli_main(["keylock-covariance", "--pipeline", "tiny:sd15", "--captions", str(root / "captions.txt"),
                     "--output", str(root / "C.safetensors")]) == 0
    return root


def _cfg(data, out, **kw):
    base = dict(pipeline="tiny:sd15", images=str(data / "img"), token="<flag>", superclass="fox",
                covariance=str(data / "C.safetensors"), output=str(out), steps=2, batch_size=1, grad_accum=1,
                templates=["a {}"], checkpoint_every=1)
    return ConceptConfig(**{**base, **kw})


def test_covariance_command_writes_the_uncentred_covariance(data):
    pipe = tiny_pipeline("sd15")
    c, meta = cc.load_covariance(data / "C.safetensors")
    assert meta["captions"] == "3" and meta["text_encoder"] == cc.encoder_fingerprint(pipe.text_encoder,
                                                                                      pipe.tokenizer)
    e = cc.encode_prompts(pipe, ["a red fox in the snow", "a fox", "the snow is white"])[0].double()
    e = e.reshape(-1, e.shape[-1])
    raw = e.t() @ e / e.shape[0]
    torch.testing.assert_close(c, raw + 1e-3 * torch.trace(raw) / raw.shape[0] * torch.eye(raw.shape[0],
                                                                                             dtype=raw.dtype))


def test_training_learns_values_and_embedding_keys_locked_and_resume_is_exact(data, tmp_path):
    pipe = tiny_pipeline("sd15")
    n_vocab = len(pipe.tokenizer)
    start = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    whole = train_concept(_cfg(data, tmp_path / "whole"), pipe=pipe, progress=False)
    assert len(pipe.tokenizer) == n_vocab and not any(p.requires_grad is False for p in pipe.unet.parameters())
    got = cc.load_concept(whole.concept)
    name = next(iter(got.values))
    assert not torch.equal(got.values[name], start.values[name])  # o*_V learned
    assert not torch.equal(got.embedding, start.embedding)  # the token embedding learned
    assert all(torch.equal(got.keys[n], start.keys[n]) for n in got.keys)  # o*_K locked
    assert not torch.equal(got.i_star, start.i_star)  # EMA of the token's encoding
    assert (got.beta, got.tau, got.token, got.superclass) == (0.7, 0.15, "<flag>", "fox")
    # stopped after one step, then resumed: the same concept as the uninterrupted run
    cfg = _cfg(data, tmp_path / "resumed")
    train_concept(_cfg(data, tmp_path / "resumed", steps=1), pipe=pipe, progress=False)
    (tmp_path / "resumed" / "concept.safetensors").unlink()
    with pytest.raises(ValueError, match="different train-concept config"):  # the config hash guards resuming
        train_concept(_cfg(data, tmp_path / "resumed", lr_values=0.5), pipe=pipe, progress=False)
    resumed = train_concept(cfg, pipe=pipe, progress=False)
    assert resumed.resumed_from == 1 and resumed.losses == whole.losses
    again = cc.load_concept(resumed.concept)
    assert torch.equal(again.embedding, got.embedding) and torch.equal(again.i_star, got.i_star)
    assert all(torch.equal(again.values[n], got.values[n]) for n in got.values)


def test_no_key_locking_ablation_trains_the_keys(data, tmp_path):
    pipe = tiny_pipeline("sd15")
    start = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    got = cc.load_concept(train_concept(_cfg(data, tmp_path, steps=1, lock_keys=False), pipe=pipe,
                                        progress=False).concept)
    assert any(not torch.equal(got.keys[n], start.keys[n]) for n in got.keys)
    assert got.extra["lock_keys"] is False


def test_masks_weight_the_loss(data, tmp_path):
    pipe = tiny_pipeline("sd15")
    plain = train_concept(_cfg(data, tmp_path / "a", steps=1), pipe=pipe, progress=False)
    masked = train_concept(_cfg(data, tmp_path / "b", steps=1, masks=str(data / "mask")), pipe=pipe, progress=False)
    assert masked.losses[0] != plain.losses[0]
    assert cc.load_concept(masked.concept).extra["masks"] is True


@pytest.mark.parametrize("change,match", [
    (dict(token=None), "token: missing"),
    (dict(epochs=3), "epochs: unknown field"),
    (dict(steps=0), "steps: must be an integer >= 1"),
    (dict(lr_values=0), r"lr_values: must be in \(0, 10\]"),
    (dict(beta=3), r"beta: must be in \[0, 1.5\]"),
    (dict(train_tau=0), r"train_tau: must be in \[0.01, 1\]"),
    (dict(templates=["no slot"]), "templates: must be a non-empty list of prompts with one {}"),
    (dict(lock_keys="yes"), "lock_keys: must be true or false"),
])
def test_config_errors_name_the_field(tmp_path, change, match):
    base = dict(pipeline="tiny:sd15", images="img", token="<flag>", superclass="fox", covariance="C.safetensors",
                output=str(tmp_path))
    with pytest.raises(ConceptConfigError, match=match):
        parse_concept_config({k: v for k, v in {**base, **change}.items() if v is not None})


def test_cli_trains_and_refuses_bad_input_cleanly(data, tmp_path, capsys):
    args = ["train-concept", "--pipeline", "tiny:sd15", "--images", str(data / "img"), "--token", "<flag>",
            "--superclass", "fox", "--covariance", str(data / "C.safetensors"), "--output", str(tmp_path / "cli"),
            "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--quiet"]
    assert cli_main(args) == 0
    assert "concept '<flag>':" in capsys.readouterr().out
    loaded = cc.load_concept(tmp_path / "cli" / "concept.safetensors")
    assert loaded.extra["images"] == 4
    bad = [a if a != "fox" else "red fox" for a in args]
    assert cli_main(bad) == 2
    assert "superclass 'red fox' is 2 tokens" in capsys.readouterr().err
    clash = [a if a != "<flag>" else "snow" for a in args]
    assert cli_main(clash) == 2
    assert "concept token 'snow' is already in the tokenizer's vocabulary" in capsys.readouterr().err
    assert attnproc.remove(tiny_pipeline("sd15")) is False


def test_sdxl_training_learns_both_encoders_rows_and_the_covariance_must_match(data, tmp_path):
    pipe = tiny_pipeline("sdxl")
    cov = cc.save_covariance(cc.estimate_covariance(pipe, ["a red fox in the snow", "a fox"]),
                             tmp_path / "C-xl.safetensors", text_encoder=cc.text_fingerprint(pipe), captions=2,
                             ridge=1e-3)
    start = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    got = cc.load_concept(train_concept(_cfg(data, tmp_path / "xl", pipeline="tiny:sdxl", covariance=str(cov),
                                             masks=str(data / "mask")), pipe=pipe, progress=False).concept)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    assert got.embedding.numel() == start.embedding.numel() == 2 * width  # one row per encoder
    assert not torch.equal(got.embedding[:width], start.embedding[:width])
    assert not torch.equal(got.embedding[width:], start.embedding[width:])
    assert all(not torch.equal(got.values[n], start.values[n]) for n in got.values)
    assert all(torch.equal(got.keys[n], start.keys[n]) for n in got.keys)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab  # the token went again
    # an SD 1.5 covariance is refused by field before anything is trained
    with pytest.raises(ConceptConfigError, match="covariance: .* is for another text encoder"):
        train_concept(_cfg(data, tmp_path / "bad", pipeline="tiny:sdxl"), pipe=pipe, progress=False)
    assert not (tmp_path / "bad" / "concept.safetensors").exists()


def test_plain_textual_inversion_trains_only_the_embedding(data, tmp_path):
    """``edit: false`` (the sanity baseline): no edit while training, only the token embedding moves."""
    pipe = tiny_pipeline("sd15")
    start = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    seen = []
    res = train_concept(_cfg(data, tmp_path, edit=False), pipe=pipe, progress=False,
                        callback=lambda step, loss: seen.append(any(isinstance(p, AttnProcessor) for p in
                                                                    pipe.unet.attn_processors.values())))
    got = cc.load_concept(res.concept)
    assert not torch.equal(got.embedding, start.embedding) and got.extra["edit"] is False
    assert all(torch.equal(got.values[n], start.values[n]) and torch.equal(got.keys[n], start.keys[n])
               for n in got.values)
    assert seen == [False, False] and "<flag>" not in pipe.tokenizer.get_vocab()
    with pytest.raises(ConceptConfigError, match="edit: must be true or false"):
        parse_concept_config({"pipeline": "tiny:sd15", "images": "i", "token": "<t>", "superclass": "fox",
                              "covariance": "C", "output": "o", "edit": "no"})


def test_captions_give_each_image_its_own_prompt(data, tmp_path, capsys):
    """``captions``: a concept drawn beside other objects is trained with prompts naming them (``<stem>.txt`` per
    image, one prompt a line, one drawn per step) instead of the templates; a missing caption or a line without
    ``{}`` is refused by field, before training."""
    pipe = tiny_pipeline("sd15")
    caps = tmp_path / "caps"
    caps.mkdir()
    texts = ["a {} and a fox", "the snow and a {}", "a {} and a fox", "the snow and a {}"]
    for i, text in enumerate(texts):
        (caps / f"{i}.txt").write_text(text + "\n" + ("a fox and a {}\n" if i == 0 else ""))
    seen, expected = [], []

    def record(module, args):
        tok = pipe.tokenizer
        if "<flag>" not in tok.get_vocab():  # encodings before the token is added (the superclass's)
            return
        if not expected:  # tokenize what each prompt must be, now that the token exists
            want = tok([t.format("<flag>") for t in texts + ["a fox and a {}"]], padding="max_length",
                       max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            expected.extend(tuple(r.tolist()) for r in want)
        seen.extend(tuple(r.tolist()) for r in args[0])

    hook = pipe.text_encoder.register_forward_pre_hook(record)
    try:
        train_concept(_cfg(data, tmp_path / "run", steps=6, batch_size=2, captions=str(caps)), pipe=pipe,
                      progress=False)
    finally:
        hook.remove()
    assert seen and set(seen) == set(expected)  # every caption line, never the template "a {}"
    (caps / "3.txt").unlink()
    with pytest.raises(ConceptConfigError, match="captions: no 3.txt for image 3.png"):
        train_concept(_cfg(data, tmp_path / "bad", captions=str(caps)), pipe=pipe, progress=False)
    args = ["train-concept", "--pipeline", "tiny:sd15", "--images", str(data / "img"), "--token", "<flag>",
            "--superclass", "fox", "--covariance", str(data / "C.safetensors"), "--output", str(tmp_path / "cli"),
            "--captions", str(caps), "--quiet"]
    assert cli_main(args) == 2 and "captions: no 3.txt for image 3.png" in capsys.readouterr().err
    (caps / "3.txt").write_text("a {} and a fox\nno slot here\n")
    with pytest.raises(ConceptConfigError, match="captions: 3.txt must hold prompts .* 'no slot here'"):
        train_concept(_cfg(data, tmp_path / "bad", captions=str(caps)), pipe=pipe, progress=False)
    assert not (tmp_path / "bad" / "concept.safetensors").exists() and "<flag>" not in pipe.tokenizer.get_vocab()


def test_a_prompt_that_pushes_the_token_out_of_the_text_window_is_refused(data, tmp_path):
    """A caption long enough that the token falls past the encoder's 77 places would leave a batch with no token
    position (``i*`` NaN, the concept file silently broken): refused by field and line, before anything is made;
    a token at the last place that holds one still trains."""
    pipe = tiny_pipeline("sd15")
    caps = tmp_path / "caps"
    caps.mkdir()
    fits = "a " * 74 + "{}"  # BOS + 74 words: the token at place 75, the end token at 76
    for i in range(4):
        (caps / f"{i}.txt").write_text(fits + ("\n" + "a " * 75 + "{}" if i == 2 else "") + "\n")
    with pytest.raises(ConceptConfigError, match=r"captions \(image 3\): prompt 2 .* past the text encoder's 77"):
        train_concept(_cfg(data, tmp_path / "bad", captions=str(caps)), pipe=pipe, progress=False)
    assert not (tmp_path / "bad").exists() and "<flag>" not in pipe.tokenizer.get_vocab()
    (caps / "2.txt").write_text(fits + "\n")
    res = train_concept(_cfg(data, tmp_path / "ok", steps=2, captions=str(caps)), pipe=pipe, progress=False)
    assert torch.isfinite(cc.load_concept(res.concept).i_star).all() and all(map(math.isfinite, res.losses))
