"""Key-locking (Perfusion): the formula, multi-concept projection, the edit in a pipeline, concept files, errors."""
from __future__ import annotations

import math

import pytest
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.processor import AttnProcessor
from attnproc.pipelines import concepts as cc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline
from attnproc.steer.keylock import gate, keylock_linear, mixed_key_linear, projection_basis, similarity

D, DOUT = 12, 10


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.t() / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the formula ----------------------------------------------------------------------------------------------
def test_rank1_identity_with_linear_gate():
    """σ replaced by sim itself gives ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/(i*ᵀC⁻¹i*)."""
    c_inv = torch.linalg.inv(_spd(D, 1))
    w, i_star, o_star, e = _rand(DOUT, D, seed=2), _rand(1, D, seed=3), _rand(1, DOUT, seed=4), _rand(5, 7, D, seed=5)
    beta, tau = 0.7, 0.15
    out = keylock_linear(e, w, None, i_star, o_star, c_inv, beta, tau)
    sim = similarity(e, i_star, c_inv)
    linear_gate = out - gate(sim, beta, tau) @ o_star + sim @ o_star
    ci = c_inv @ i_star[0]
    w_edit = w + torch.outer(o_star[0] - w @ i_star[0], ci) / (i_star[0] @ ci)
    torch.testing.assert_close(linear_gate, e @ w_edit.t(), rtol=1e-10, atol=1e-10)
    # at e = i*: W(i* − i*) vanishes and the output is the gated target alone
    at = keylock_linear(i_star, w, None, i_star, o_star, c_inv, beta, tau)
    torch.testing.assert_close(at, torch.sigmoid(torch.tensor((1 - beta) / tau, dtype=torch.float64)) * o_star)


def test_gate_values_at_reference_defaults():
    c_inv = torch.linalg.inv(_spd(D, 6))
    i_star = _rand(1, D, seed=7)
    assert similarity(i_star, i_star, c_inv).item() == pytest.approx(1.0, abs=1e-12)
    g = gate(similarity(i_star, i_star, c_inv), 0.7, 0.15).item()
    assert g == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-12) and round(g, 2) == 0.88
    # e C⁻¹-orthogonal to i*: sim 0, gate σ(−β/τ) ≈ 0.0093, the output is W e + 0.0093·o*
    e = _rand(4, D, seed=8)
    ci = c_inv @ i_star[0]
    e = e - (e @ ci)[:, None] * i_star / (i_star[0] @ ci)
    assert similarity(e, i_star, c_inv).abs().max().item() < 1e-12
    w, o_star = _rand(DOUT, D, seed=9), _rand(1, DOUT, seed=10)
    low = 1 / (1 + math.exp(0.7 / 0.15))
    assert round(low, 4) == 0.0093
    torch.testing.assert_close(keylock_linear(e, w, None, i_star, o_star, c_inv, 0.7, 0.15),
                               e @ w.t() + low * o_star)


def test_multi_concept_projection_is_orthogonal_in_the_cinv_metric():
    c_inv = torch.linalg.inv(_spd(D, 11))
    i_stars = _rand(3, D, seed=12)
    u = projection_basis(i_stars, c_inv)
    torch.testing.assert_close(u.t() @ c_inv @ u, torch.eye(3, dtype=torch.float64))
    e = _rand(6, D, seed=13)
    w = torch.eye(D, dtype=torch.float64)  # W = I, o* = 0 and a huge β: the output is e − P e itself
    zero = torch.zeros(3, D, dtype=torch.float64)
    exact = keylock_linear(e, w, None, i_stars, zero, c_inv, 1e9, 1.0, multi="exact")
    approx = keylock_linear(e, w, None, i_stars, zero, c_inv, 1e9, 1.0, multi="approx")
    assert (exact @ c_inv @ i_stars.t()).abs().max().item() < 1e-9  # residual ⊥ every i*_c
    assert (approx @ c_inv @ i_stars.t()).abs().max().item() > 1e-3  # the per-concept approximation is not
    # both agree when the concepts are already C⁻¹-orthogonal, and for one concept
    ortho = u.t() * torch.tensor([[2.0], [0.5], [1.5]], dtype=torch.float64)
    torch.testing.assert_close(keylock_linear(e, w, None, ortho, zero, c_inv, 1e9, 1.0, multi="exact"),
                               keylock_linear(e, w, None, ortho, zero, c_inv, 1e9, 1.0, multi="approx"))
    torch.testing.assert_close(keylock_linear(e, w, None, i_stars[:1], zero[:1], c_inv, 0.7, 0.15, multi="exact"),
                               keylock_linear(e, w, None, i_stars[:1], zero[:1], c_inv, 0.7, 0.15, multi="approx"))


def test_mixed_keys_average_each_tokens_own_key_with_the_gated_superclass_keys():
    """keys="mixed": (W e + b + Σ_c g_c o*_c)/(1 + Σ_c g_c), checked element by element in float64 with two
    correlated concepts; a token no concept resembles keeps W e + b, a token equal to i* with its gate open is the
    mean of its own and its superclass key."""
    c_inv = torch.linalg.inv(_spd(D, 21))
    i_stars = _rand(2, D, seed=22)
    i_stars[1] = 0.8 * i_stars[0] + 0.2 * i_stars[1]  # strongly correlated in any metric
    w, b, o_stars = _rand(DOUT, D, seed=23), _rand(DOUT, seed=24), _rand(2, DOUT, seed=25)
    betas, taus = torch.tensor([0.7, 0.5], dtype=torch.float64), torch.tensor([0.15, 0.2], dtype=torch.float64)
    e = torch.cat([i_stars, _rand(3, D, seed=26)])
    got = mixed_key_linear(e, w, b, i_stars, o_stars, c_inv, betas, taus)
    for t in range(e.shape[0]):
        gates = []
        for c in range(2):
            sim = float(e[t] @ c_inv @ i_stars[c]) / float(i_stars[c] @ c_inv @ i_stars[c])
            gates.append(1 / (1 + math.exp(-(sim - float(betas[c])) / float(taus[c]))))
        want = (w @ e[t] + b + gates[0] * o_stars[0] + gates[1] * o_stars[1]) / (1 + sum(gates))
        torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12)
    # a C⁻¹-orthogonal token with the gates shut (β far above its sim 0) keeps its own key exactly
    ci = c_inv @ i_stars[0]
    ortho = e[2:] - (e[2:] @ ci)[:, None] * i_stars[:1] / (i_stars[0] @ ci)
    shut = mixed_key_linear(ortho, w, b, i_stars[:1], o_stars[:1], c_inv, 1.0, 0.01)
    torch.testing.assert_close(shut, ortho @ w.t() + b, rtol=1e-12, atol=1e-12)
    # e = i* with its gate open (β 0, τ 0.01: σ(100)): the mean of its own key and the superclass key
    opened = mixed_key_linear(i_stars[:1], w, b, i_stars[:1], o_stars[:1], c_inv, 0.0, 0.01)
    torch.testing.assert_close(opened, (i_stars[:1] @ w.t() + b + o_stars[:1]) / 2, rtol=1e-12, atol=1e-12)


# ---- in a pipeline ---------------------------------------------------------------------------------------------
def _concept_setup(family: str, embedding_noise: float = 0.0):
    """A tiny pipeline, a concept with learned-looking o*_V (so the edit visibly changes the values) and C."""
    pipe = tiny_pipeline(family)
    con = cc.initial_concept(pipe, "<flag>", "fox", ["a {}", "a red {} in the snow"])
    g = torch.Generator().manual_seed(0)
    for t in con.values.values():
        t.add_(torch.randn(t.shape, generator=g))
    if embedding_noise:
        con.embedding = con.embedding + embedding_noise * torch.randn(con.embedding.shape, generator=g)
    cov = cc.estimate_covariance(pipe, ["a red fox in the snow", "a fox", "the snow is white", "a red fox"])
    return pipe, con, cov


@pytest.fixture(scope="module")
def sd15():
    return _concept_setup("sd15")


def _image(pipe, prompt, family="sd15"):
    kw = tiny_call_kwargs(family, prompt=prompt, num_inference_steps=2, height=64, width=64)
    kw["generator"] = torch.Generator().manual_seed(0)
    return pipe(**kw).images


class KVRecorder(attnproc.Method):
    """A base method that records the keys and values of every cross-attention call (then attends densely)."""

    name = "kv_recorder_test"
    summary = "test: records k and v of cross-attention calls"

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        if site.kind == "cross":
            self.seen.append((site.name, site.inputs.encoder_hidden_states, k, v))
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


if "kv_recorder_test" not in attnproc.registry.REGISTRY.names():
    attnproc.register(KVRecorder)


def test_edit_computes_keys_and_values_by_the_formula_under_a_base_method(sd15):
    pipe, con, cov = sd15
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"], keylock={"concepts": [con], "covariance": cov})
    try:
        _image(pipe, "a red <flag> in the snow")
        seen = handle.method.base.seen
        unet = dict(pipe.unet.named_modules())
        assert {name for name, *_ in seen} == {n for n, _ in cc.cross_attention_modules(pipe.unet)}
        c_inv = torch.linalg.inv(cov).float()
        for name, e, k, v in seen[:4]:
            attn = unet[name]
            for proj, got, target in ((attn.to_k, k, con.keys[name]), (attn.to_v, v, con.values[name])):
                want = keylock_linear(e, proj.weight, proj.bias, con.i_star[None], target[None], c_inv, 0.7, 0.15)
                want = want.view(e.shape[0], -1, got.shape[1], got.shape[-1]).transpose(1, 2)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                assert (got - proj(e).view_as(want.transpose(1, 2)).transpose(1, 2)).abs().max() > 1e-3
    finally:
        attnproc.remove(pipe)


def test_mixed_keys_change_only_the_keys_in_a_pipeline(sd15):
    pipe, con, cov = sd15
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "keys": "mixed"})
    try:
        _image(pipe, "a red <flag> in the snow")
        seen = handle.method.base.seen
        unet = dict(pipe.unet.named_modules())
        c_inv = torch.linalg.inv(cov).float()
        for name, e, k, v in seen[:4]:
            attn = unet[name]
            args = (e, attn.to_k.weight, attn.to_k.bias, con.i_star[None], con.keys[name][None], c_inv, 0.7, 0.15)
            for got, want in ((k, mixed_key_linear(*args)),
                              (v, keylock_linear(e, attn.to_v.weight, attn.to_v.bias, con.i_star[None],
                                                 con.values[name][None], c_inv, 0.7, 0.15))):
                want = want.view(e.shape[0], -1, got.shape[1], got.shape[-1]).transpose(1, 2)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            locked = keylock_linear(*args).view(e.shape[0], -1, k.shape[1], k.shape[-1]).transpose(1, 2)
            assert (k - locked).abs().max() > 1e-3  # the option reaches the keys
    finally:
        attnproc.remove(pipe)


def test_mixed_keys_with_two_concepts_in_a_pipeline(sd15):
    """keys="mixed" with two concepts (own β each): the keys are the two-concept formula, values the exact projection."""
    pipe, con, cov = sd15
    other = cc.initial_concept(pipe, "<dot>", "snow", ["a {}"])
    other.embedding = other.embedding + 0.5 * torch.randn(other.embedding.shape, generator=torch.Generator().manual_seed(1))
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"], keylock={
        "concepts": [{"file": con, "beta": 0.5}, other], "covariance": cov, "keys": "mixed"})
    try:
        _image(pipe, "a <flag> and a <dot>")
        unet = dict(pipe.unet.named_modules())
        c_inv = torch.linalg.inv(cov).float()
        i_stars, betas = torch.stack([con.i_star, other.i_star]), torch.tensor([0.5, 0.7])
        for name, e, k, v in handle.method.base.seen[:4]:
            attn = unet[name]
            o_k = torch.stack([con.keys[name], other.keys[name]])
            o_v = torch.stack([con.values[name], other.values[name]])
            for got, want in ((k, mixed_key_linear(e, attn.to_k.weight, attn.to_k.bias, i_stars, o_k, c_inv, betas, 0.15)),
                              (v, keylock_linear(e, attn.to_v.weight, attn.to_v.bias, i_stars, o_v, c_inv, betas, 0.15))):
                torch.testing.assert_close(got, want.view(e.shape[0], -1, got.shape[1], got.shape[-1]).transpose(1, 2),
                                           rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)


def test_global_locking_takes_keys_from_the_superclass_prompt(sd15):
    pipe, con, cov = sd15
    g = torch.Generator().manual_seed(2)  # a learned-looking embedding: the prompt's encoding differs from the plain one
    con = cc.Concept(**{**con.__dict__, "embedding": con.embedding + torch.randn(con.embedding.shape, generator=g)})
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        _image(pipe, "a red <flag> in the snow")
        name, e, k, v = handle.method.base.seen[0]
        attn = dict(pipe.unet.named_modules())[name]
        plain = cc.encode_prompts(pipe, ["a red fox in the snow"])[0].detach()
        assert e.shape[0] == 2 and not torch.equal(e[1], plain[0])  # CFG: [uncond, cond]
        c_inv = torch.linalg.inv(cov).float()

        def heads(x, like):
            return x.view(x.shape[0], -1, like.shape[1], like.shape[-1]).transpose(1, 2)

        ctx = torch.stack([e[0], plain[0]])  # the uncond row holds no concept: its own encoding
        want_k = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None], c_inv, 0.7, 0.15)
        want_v = keylock_linear(e, attn.to_v.weight, None, con.i_star[None], con.values[name][None], c_inv, 0.7, 0.15)
        torch.testing.assert_close(k, heads(want_k, k), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, heads(want_v, v), rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)
    assert not pipe.text_encoder._forward_hooks  # the encoder hook went with remove()


def test_trained_parameters_are_the_values_and_keys_stay_locked(sd15):
    """lucidrains' verified bug: its parameters() returned o*_K and never o*_V. Here the optimizer gets o*_V."""
    pipe, con, cov = sd15
    handle = attnproc.apply(pipe, "keylock", concepts=[con], covariance=cov)
    try:
        states = handle.states()
        assert len(states) == 7  # the tiny UNet's cross-attention modules
        params = list(handle.parameters())
        assert len(params) == 7 and all(p is s.keylock.o_v for p, s in zip(params, states.values()))
        assert all("o_k" in dict(s.keylock.named_buffers()) for s in states.values())
        keys_before = {n: s.keylock.o_k.clone() for n, s in states.items()}
        values_before = {n: s.keylock.o_v.detach().clone() for n, s in states.items()}
        opt = torch.optim.AdamW(params, lr=0.03)
        enc, _ = cc.encode_prompts(pipe, ["a red <flag> in the snow"])
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        pipe.unet(x, 500, encoder_hidden_states=enc.detach()).sample.square().mean().backward()
        opt.step()
        for n, s in states.items():
            assert torch.equal(s.keylock.o_k, keys_before[n])
            assert not torch.equal(s.keylock.o_v.detach(), values_before[n])
        assert set(handle.state_dict()) == {f"{n}.attnproc.keylock.{t}" for n in states for t in ("o_k", "o_v")}
    finally:
        attnproc.remove(pipe)


def test_constructor_arguments_are_the_documented_options(sd15):
    """lucidrains' verified bug: its builder passed input_covariance= to a constructor expecting C=."""
    pipe, con, cov = sd15
    method = attnproc.create("keylock", concepts=[con], covariance=cov, beta=0.6, tau=0.2, multi="approx")
    assert method.betas.tolist() == [pytest.approx(0.6)] and method.taus.tolist() == [pytest.approx(0.2)]
    with pytest.raises(attnproc.OptionError, match="unknown option.*'input_covariance'.*valid options: concepts, "
                                                   "covariance, beta, tau, multi, locking, keys, lock_keys"):
        attnproc.create("keylock", concepts=[con], input_covariance=cov)


def test_token_is_added_on_apply_and_removed_on_remove(sd15):
    pipe, con, cov = sd15
    n_vocab, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]
    before = _image(pipe, "a red fox in the snow")
    attnproc.apply(pipe, "keylock", concepts=[con], covariance=cov)
    tid = pipe.tokenizer.convert_tokens_to_ids("<flag>")
    assert len(pipe.tokenizer) == n_vocab + 1 and tid == n_vocab
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[tid], con.embedding, rtol=0, atol=0)
    edited = _image(pipe, "a red fox in the snow")
    assert abs(edited - before).max() > 0  # the edit touches every cross-attention call (sim of other tokens)
    assert attnproc.remove(pipe)
    assert len(pipe.tokenizer) == n_vocab and "<flag>" not in pipe.tokenizer.get_vocab()
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert (_image(pipe, "a red fox in the snow") == before).all()


def test_save_load_generate_is_bit_identical(sd15, tmp_path):
    pipe, con, cov = sd15
    path = cc.save_concept(con, tmp_path / "flag.safetensors")
    cov_path = cc.save_covariance(cov, tmp_path / "C.safetensors", text_encoder=con.text_encoder, captions=4,
                                  ridge=1e-3)
    loaded = cc.load_concept(path)
    assert (loaded.token, loaded.superclass, loaded.beta, loaded.tau) == ("<flag>", "fox", 0.7, 0.15)
    assert list(loaded.values) == list(con.values)
    for name in con.values:
        assert torch.equal(loaded.values[name], con.values[name]) and torch.equal(loaded.keys[name], con.keys[name])
    images = []
    for concept, c in ((con, cov), (str(path), str(cov_path))):
        attnproc.apply(pipe, "keylock", concepts=[concept], covariance=c)
        images.append(_image(pipe, "a red <flag> in the snow"))
        attnproc.remove(pipe)
    assert (images[0] == images[1]).all()


def test_two_concepts_with_own_beta(sd15, tmp_path):
    pipe, con, cov = sd15
    other = cc.initial_concept(pipe, "<dot>", "snow", ["a {}"])
    method = attnproc.create("keylock", concepts=[{"file": cc.save_concept(con, tmp_path / "a.safetensors"),
                                                   "beta": 0.6}, other], covariance=cov)
    assert method.betas.tolist() == pytest.approx([0.6, 0.7]) and method.tokens == ["<flag>", "<dot>"]
    attnproc.apply(pipe, "keylock", concepts=[con, other], covariance=cov)
    try:
        assert {"<flag>", "<dot>"} <= set(pipe.tokenizer.get_vocab())
        assert _image(pipe, "a <flag> and a <dot>").shape == (1, 3, 64, 64)
    finally:
        attnproc.remove(pipe)
    assert "<dot>" not in pipe.tokenizer.get_vocab()


# ---- bad input: clear errors, nothing changed -----------------------------------------------------------------
def _untouched(pipe, n_vocab):
    assert len(pipe.tokenizer) == n_vocab
    assert not any(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())


def test_concept_for_another_model_is_refused(sd15, tmp_path):
    pipe, con, cov = sd15
    other = tiny_pipeline("sd15", seed=1)
    foreign = cc.initial_concept(other, "<flag>", "fox", ["a {}"])
    n = len(pipe.tokenizer)
    with pytest.raises(attnproc.UnsupportedModelError, match="trained on another model"):
        attnproc.apply(pipe, "keylock", concepts=[foreign], covariance=cov)
    _untouched(pipe, n)


def test_missing_or_foreign_covariance_is_refused(sd15, tmp_path):
    pipe, con, cov = sd15
    with pytest.raises(attnproc.OptionError, match="option 'covariance' is required"):
        attnproc.create("keylock", concepts=[con])
    with pytest.raises(attnproc.OptionError, match="covariance file .*nope.safetensors' does not exist; estimate"):
        attnproc.create("keylock", concepts=[con], covariance=str(tmp_path / "nope.safetensors"))
    path = cc.save_covariance(cov, tmp_path / "C.safetensors", text_encoder="0123456789abcdef", captions=4, ridge=0)
    with pytest.raises(attnproc.OptionError, match="another text encoder than the covariance file"):
        attnproc.create("keylock", concepts=[con], covariance=str(path))
    with pytest.raises(attnproc.OptionError, match=r"the covariance is \(3, 3\)"):
        attnproc.create("keylock", concepts=[con], covariance=torch.eye(3))


def test_token_already_in_vocabulary_is_refused(sd15):
    pipe, con, cov = sd15
    n = len(pipe.tokenizer)
    clash = cc.Concept(**{**con.__dict__, "token": "fox"})
    with pytest.raises(ValueError, match="concept token 'fox' is already in the tokenizer's vocabulary"):
        attnproc.apply(pipe, "keylock", concepts=[clash], covariance=cov)
    _untouched(pipe, n)
    with pytest.raises(ValueError, match="two concepts use the token '<flag>'"):
        attnproc.apply(pipe, "keylock", concepts=[con, con], covariance=cov)
    _untouched(pipe, n)


@pytest.mark.parametrize("options, message", [
    ({"beta": 2.0}, r"option 'beta' of method 'keylock' is out of range: got 2.0, valid: float in \[0, 1.5\]"),
    ({"tau": 0.0}, r"option 'tau' of method 'keylock' is out of range: got 0.0, valid: float in \[0.01, 1\]"),
    ({"concepts": [{"file": "x.safetensors", "beta": -1}]}, r"concepts\[0\].beta must be a number in \[0, 1.5\]"),
    ({"concepts": [{"file": "x.safetensors", "tau": 5}]}, r"concepts\[0\].tau must be a number in \[0.01, 1\]"),
    ({"concepts": []}, "option 'concepts' is required"),
    ({"concepts": ["missing.safetensors"]}, r"concepts\[0\]: concept file 'missing.safetensors' does not exist"),
    ({"multi": "qr"}, r"option 'multi' of method 'keylock' must be one of 'exact', 'approx'"),
    ({"keys": "open"}, r"option 'keys' of method 'keylock' must be one of 'locked', 'mixed'"),
    ({"keys": "mixed", "locking": "global"}, r"option 'keys'='mixed' needs locking='local'"),
])
def test_bad_options(sd15, options, message):
    _, con, cov = sd15
    kw = {"concepts": [con], "covariance": cov, **options}
    with pytest.raises(attnproc.OptionError, match=message):
        attnproc.create("keylock", **kw)


def test_damaged_or_foreign_file_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(cc.ConceptFileError, match="cannot read it as a safetensors concept file"):
        cc.load_concept(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(cc.ConceptFileError, match="is not an attnproc concept file"):
        cc.load_concept(tmp_path / "lora.safetensors")


def test_sd15_sized_concept_file_is_at_most_110_kb(tmp_path):
    """The issue's size target, on SD 1.5's real cross-attention shapes (built on the meta device, no weights;
    diffusers' default UNet2DConditionModel is SD 1.x's but for the 768-wide text context)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)
    mods = cc.cross_attention_modules(unet)
    concept = cc.Concept(token="<c>", superclass="teddy", embedding=torch.zeros(768), i_star=torch.zeros(768),
                         keys={n: torch.zeros(m.to_k.out_features) for n, m in mods},
                         values={n: torch.zeros(m.to_v.out_features) for n, m in mods},
                         model="0" * 16, text_encoder="0" * 16)
    assert len(mods) == 16 and sum(t.numel() for t in concept.values.values()) == 12480
    size = cc.save_concept(concept, tmp_path / "sd15.safetensors").stat().st_size
    assert 26496 * 4 < size <= 110 * 1024
    assert [t.numel() for t in cc.load_concept(tmp_path / "sd15.safetensors").keys.values()] == \
        [m.to_k.out_features for _, m in mods]


# ---- SDXL: two text encoders, one concatenated context ---------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl():
    return _concept_setup("sdxl", embedding_noise=0.5)


def test_sdxl_token_in_both_encoders_and_keys_values_by_the_formula(sdxl):
    pipe, con, cov = sdxl
    widths = [pipe.text_encoder.get_input_embeddings().weight.shape[-1],
              pipe.text_encoder_2.get_input_embeddings().weight.shape[-1]]
    assert con.embedding.numel() == sum(widths) and con.i_star.numel() == pipe.unet.config.cross_attention_dim
    n_vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"], keylock={"concepts": [con], "covariance": cov})
    try:
        for te, tok, part in ((pipe.text_encoder, pipe.tokenizer, con.embedding[:widths[0]]),
                              (pipe.text_encoder_2, pipe.tokenizer_2, con.embedding[widths[0]:])):
            tid = tok.convert_tokens_to_ids("<flag>")
            torch.testing.assert_close(te.get_input_embeddings().weight[tid], part, rtol=0, atol=0)
        _image(pipe, "a red <flag> in the snow", "sdxl")
        seen = handle.method.base.seen
        unet = dict(pipe.unet.named_modules())
        assert {name for name, *_ in seen} == {n for n, _ in cc.cross_attention_modules(pipe.unet)}
        # the edit sees both encoders' penultimate states, concatenated: the pipeline's own prompt encoding
        want_e = pipe.encode_prompt("a red <flag> in the snow", do_classifier_free_guidance=False)[0]
        c_inv = torch.linalg.inv(cov).float()
        for name, e, k, v in seen[:4]:
            torch.testing.assert_close(e[-1:], want_e, rtol=1e-5, atol=1e-5)
            attn = unet[name]
            for proj, got, target in ((attn.to_k, k, con.keys[name]), (attn.to_v, v, con.values[name])):
                want = keylock_linear(e, proj.weight, proj.bias, con.i_star[None], target[None], c_inv, 0.7, 0.15)
                want = want.view(e.shape[0], -1, got.shape[1], got.shape[-1]).transpose(1, 2)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == n_vocab
    assert "<flag>" not in pipe.tokenizer.get_vocab() and "<flag>" not in pipe.tokenizer_2.get_vocab()


def test_sdxl_save_load_generate_is_bit_identical(sdxl, tmp_path):
    pipe, con, cov = sdxl
    plain = _image(pipe, "a red fox in the snow", "sdxl")
    path = cc.save_concept(con, tmp_path / "flag.safetensors")
    cov_path = cc.save_covariance(cov, tmp_path / "C.safetensors", text_encoder=cc.text_fingerprint(pipe),
                                  captions=4, ridge=1e-3)
    images = []
    for concept, c in ((con, cov), (str(path), str(cov_path))):
        attnproc.apply(pipe, "keylock", concepts=[concept], covariance=c)
        images.append(_image(pipe, "a red <flag> in the snow", "sdxl"))
        attnproc.remove(pipe)
    assert (images[0] == images[1]).all()
    assert abs(images[0] - plain).max() > 1e-3  # the concept is really in the picture
    assert (_image(pipe, "a red fox in the snow", "sdxl") == plain).all()  # and gone after remove()


def _superclass_context_by_hand(pipe, prompt: str, concept: cc.Concept) -> torch.Tensor:
    """The reference for SDXL global locking, built without the edit: ``prompt`` with the concept token replaced by
    the superclass token in each tokenizer, encoded by each encoder, penultimate states concatenated."""
    parts = []
    for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        ids[ids == tok.convert_tokens_to_ids(concept.token)] = tok(concept.superclass, add_special_tokens=False).input_ids[0]
        parts.append(te(ids, output_hidden_states=True).hidden_states[-2])
    return torch.cat(parts, -1)[0].detach()


def test_sdxl_global_locking_takes_keys_from_both_encoders_superclass_prompt(sdxl):
    pipe, con, cov = sdxl
    prompt = "a red <flag> in the snow"
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        _image(pipe, prompt, "sdxl")
        seen = handle.method.base.seen
        assert len(seen) > 4
        plain = _superclass_context_by_hand(pipe, prompt, con)
        unet = dict(pipe.unet.named_modules())
        c_inv = torch.linalg.inv(cov).float()
        for name, e, k, v in seen[:4] + seen[-2:]:
            assert e.shape[0] == 2 and (e[0] == 0).all()  # CFG: [zeroed uncond, cond] (force_zeros_for_empty_prompt)
            assert (e[1] - plain).abs().max() > 1e-2  # the concept's prompt differs from the superclass prompt
            attn = unet[name]
            ctx = torch.stack([e[0], plain])  # the uncond row holds no concept: its own encoding
            want_k = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None], c_inv, 0.7,
                                    0.15)
            want_v = keylock_linear(e, attn.to_v.weight, None, con.i_star[None], con.values[name][None], c_inv, 0.7,
                                    0.15)
            heads = lambda x, like: x.view(x.shape[0], -1, like.shape[1], like.shape[-1]).transpose(1, 2)  # noqa: E731
            torch.testing.assert_close(k, heads(want_k, k), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, heads(want_v, v), rtol=1e-5, atol=1e-5)  # values from the prompt itself
            local_k = keylock_linear(e, attn.to_k.weight, None, con.i_star[None], con.keys[name][None], c_inv, 0.7,
                                     0.15)
            assert (k - heads(local_k, k)).abs().max() > 1e-3  # and global keys are not the local ones
    finally:
        attnproc.remove(pipe)
    assert not pipe.text_encoder._forward_hooks and not pipe.text_encoder_2._forward_hooks


def test_sdxl_global_locking_takes_only_the_encoder_whose_prompt_holds_the_concept(sdxl):
    """prompt_2 (the second encoder's prompt) without the concept: only the first encoder's slice is swapped."""
    pipe, con, cov = sdxl
    handle = attnproc.apply(pipe, ["kv_recorder_test", "keylock"],
                            keylock={"concepts": [con], "covariance": cov, "locking": "global"})
    try:
        kw = tiny_call_kwargs("sdxl", prompt="a red <flag> in the snow", prompt_2="a red fox in the snow",
                              num_inference_steps=1, height=64, width=64, guidance_scale=1.0)
        kw["generator"] = torch.Generator().manual_seed(0)
        pipe(**kw)
        name, e, k, _ = handle.method.base.seen[0]
        width = pipe.text_encoder.config.hidden_size
        plain = _superclass_context_by_hand(pipe, "a red <flag> in the snow", con)
        ctx = torch.cat([plain[:, :width], e[0, :, width:]], -1)[None]
        attn = dict(pipe.unet.named_modules())[name]
        want = keylock_linear(ctx, attn.to_k.weight, None, con.i_star[None], con.keys[name][None],
                              torch.linalg.inv(cov).float(), 0.7, 0.15)
        torch.testing.assert_close(k, want.view(1, -1, k.shape[1], k.shape[-1]).transpose(1, 2), rtol=1e-5, atol=1e-5)
    finally:
        attnproc.remove(pipe)


def test_sdxl_refuses_another_encoders_concept(sdxl, sd15):
    pipe, con, cov = sdxl
    n_vocab = len(pipe.tokenizer_2)
    other = cc.Concept(**{**con.__dict__, "text_encoder": sd15[1].text_encoder})
    with pytest.raises(attnproc.UnsupportedModelError, match="trained with another text encoder"):
        attnproc.apply(pipe, "keylock", concepts=[other], covariance=cov, locking="global")
    assert len(pipe.tokenizer_2) == n_vocab and "<flag>" not in pipe.tokenizer.get_vocab()
    assert not pipe.text_encoder._forward_hooks and not pipe.text_encoder_2._forward_hooks


def test_global_locking_refuses_a_superclass_of_several_tokens_before_adding_any_token(sdxl):
    """Global locking needs each superclass as one token of every tokenizer; a refusal names the field and leaves
    both vocabularies, the encoders' hooks and the processors as they were."""
    pipe, con, cov = sdxl
    bad = cc.Concept(**{**con.__dict__, "superclass": "snow white"})
    vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    hooks = (len(pipe.text_encoder._forward_hooks), len(pipe.text_encoder_2._forward_hooks))
    procs = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=r"concepts\[0\]\.superclass \(locking='global'\): superclass 'snow white'"):
        attnproc.apply(pipe, "keylock", concepts=[bad], covariance=cov, locking="global")
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab and "<flag>" not in pipe.tokenizer_2.get_vocab()
    assert (len(pipe.text_encoder._forward_hooks), len(pipe.text_encoder_2._forward_hooks)) == hooks
    assert dict(pipe.unet.attn_processors) == procs
