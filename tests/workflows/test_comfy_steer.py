"""The steering-edit ComfyUI nodes (workflows/comfy_steer.py) in the real ComfyUI engine (0.30.0): comfy_engine.py's
``steer`` section runs them in a subprocess on the tiny native SD1.x UNet and CLIP (and, for keylock, a tiny
SDXL UNet and SDXL CLIP, and ComfyUI's SD20 model and SD 2.x CLIP carrying a tiny diffusers SD 2.x pipeline's
weights); the numbers are asserted here. See docs/comfyui.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_comfy_engine import comfyui_dir

FP32 = 1e-5  # relative error of the fp32 node against the float64 definition (measured ~1e-6)


@pytest.fixture(scope="module")
def steer(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui_steer")
    out = work / "results.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_engine.py")), str(comfyui_dir()),
                           str(work), str(out), "steer"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    return results


def test_structured_phrases_bound_with_comfyui_tokenizer(steer):
    # "a red circle and a blue square": start token at 0; each phrase alone sits at 1..3 after its start token
    assert steer["structured_alignments"] == [[[1, 2, 3], [1, 2, 3]], [[5, 6, 7], [1, 2, 3]]]


@pytest.mark.parametrize("mode", ["values", "conjunction"])
def test_structured_node_matches_the_definition_and_passes_the_rest(steer, mode):
    r = steer[f"structured_{mode}"]
    assert r["blocks"] == 7  # one attn2 replacement per transformer block of the tiny UNet
    # active_steps=0.5 of 4 steps: the cond rows of 7 blocks in steps 0 and 1; steps 2 and 3 passed through
    assert r["steered"] == 14 and r["steps"] == 2 and r["passed"] == 14
    assert r["vs_reference"] < FP32  # the conditional rows: StructureDiffusion's formula (float64)
    assert r["rows_vs_stock"] == 0.0  # the uncond rows of steered calls: ComfyUI's own attention, bit for bit
    assert r["passed_vs_stock"] == 0.0  # inactive steps: bit-identical
    assert r["finite"] and r["vs_stock"] > 1e-3  # the sample changes


def test_structured_node_inactive_is_stock(steer):
    assert steer["structured_inactive_vs_stock"] == 0.0


def test_structured_node_errors(steer):
    e = steer["structured_errors"]
    assert "phrase 'a green circle' is not in the prompt" in e["missing"]
    assert "phrases 'a red circle' and 'red circle and' overlap" in e["overlap"]
    assert "differently from plain text (prompt weights" in e["weights"]
    assert "option 'mode' of method 'structured' must be one of 'values', 'conjunction'" in e["mode"]
    assert "option 'active_steps' of method 'structured' is out of range" in e["steps"]
    assert "no conditional prompt of this sampler is the node's prompt" in e["other_prompt"]
    assert e["model_untouched"] is True  # a refused node leaves the input MODEL as it was


# ComfyUI's CPU numerics differ between a batch of 3 and a batch of 1 (the stock model: ~1e-4, measured in
# stock_batch_vs_alone); the references are compared bit for bit with the same batch sampled without the edit
BATCH_NUMERICS = 1e-3


def test_isolate_node_keeps_the_references_and_changes_the_scene(steer):
    r = steer["isolate"]
    assert r["references_vs_plain_batch"] == [0.0, 0.0]  # reference images: exactly as without isolate
    assert max(r["references_vs_alone"]) < BATCH_NUMERICS  # and as sampled alone (same noise, batch_index)
    assert r["stock_batch_vs_alone"] < BATCH_NUMERICS
    assert r["plain_batch_vs_alone"][2] == r["stock_batch_vs_alone"]  # the prompt wrapper alone edits nothing
    assert r["finite"] and r["scene_vs_plain_batch"] > 1e-2  # the scene changes


def test_isolate_node_with_attention_masks(steer):
    r = steer["isolate"]["auto_masks"]  # subjects without boxes: masks from the previous step's attention (Otsu)
    assert r["references_vs_plain_batch"] == [0.0, 0.0]
    assert r["finite"] and r["scene_vs_plain_batch"] > 1e-3


def test_isolate_node_errors(steer):
    e = steer["isolate"]["errors"]
    assert "2 subject(s) need 2 reference prompt(s) and the scene prompt" in e["more_subjects"]
    assert "subject 1 (target box): 'box' [0.5, 0.2, 1.4, 0.6] must satisfy 0 <= x0 < x1 <= 1" in e["box"]
    assert "phrase 'green circle'" in e["phrase"] and "is not in the prompt" in e["phrase"]
    assert "subjects is not valid JSON" in e["json"]
    assert "option 'mutual_lambda' of method 'isolate' is out of range" in e["option"]
    assert "need a latent batch of 3" in e["batch"] and "set the batch_size of the empty latent to 3" in e["batch"]
    assert "positive conditioning is not the node's scene prompt" in e["positive"]
    assert e["model_untouched"] is True


def test_concept_token_through_comfyui_embeddings(steer):
    r = steer["keylock"]
    # "a embedding:tri on the grass": start token, "a", then the concept's own embedding vector
    assert r["embedding_positions"] == [2] and r["embedding_is_concept"] is True
    assert r["input_clip_unchanged"] is True  # the concept clip is a clone with its own tokenizer


@pytest.mark.parametrize("gate", ["open", "closed", "default"])
def test_keylock_node_matches_the_formula(steer, gate):
    r = steer["keylock"][gate]
    assert r["calls"] == 28  # 7 cross-attention blocks x 4 steps (cond and uncond batched)
    assert r["k_err"] < FP32 and r["v_err"] < FP32  # W(e - sim i*) + sigmoid((sim - beta)/tau) o*, float64
    assert r["out_vs_attention"] == 0.0  # ComfyUI's attention on the edited keys and values
    assert r["finite"] and r["vs_stock"] > 1e-3
    # at the concept token (e = i*, sim = 1) the key is gate * o*_K: o*_K with the gate open, 0 closed,
    # sigmoid((1 - 0.7) / 0.15) = 0.881 of it at the reference defaults
    expected = {"open": (0.0, 1.0), "closed": (1.0, 0.0), "default": (1 - 0.8808, 0.8808)}[gate]
    assert abs(r["token_open"] - expected[0]) < 1e-3 and abs(r["token_closed"] - expected[1]) < 1e-3


def test_keylock_node_mixed_keys_match_the_formula(steer):
    """keys="mixed" reaches the node: its keys are (W e + g·o*_K)/(1 + g) in float64, values as the paper."""
    r = steer["keylock"]["mixed"]
    assert r["calls"] == 28 and r["k_err"] < FP32 and r["v_err"] < FP32 and r["out_vs_attention"] == 0.0
    assert r["finite"] and r["vs_locked"] > 1e-3


def test_keylock_node_errors(steer):
    e = steer["keylock"]["errors"]
    assert "was trained on another model (fingerprint 0123456789abcdef" in e["other_model"]
    assert "which this ComfyUI model does not have: it is for another architecture" in e["architecture"]
    assert "concepts[0].beta must be a number in [0, 1.5], got 3.0" in e["beta"]
    assert "option 'covariance' is required" in e["covariance"]
    assert "does not exist" in e["missing_file"]
    assert "option 'locking' of method 'keylock' must be one of 'local', 'global', got 'both'" in e["locking"]
    assert "superclass 'snow leopard' of concept '<tri>' is 2 tokens for ComfyUI's clip_l tokenizer" in \
        e["encode_two_word_superclass"]
    assert "option 'concepts' is required" in e["encode_no_concepts"]
    assert e["model_untouched"] is True


def _global_locking_checks(r, calls):
    # the encode node's conditioning is CLIPTextEncode's own; the superclass encoding it carries reaches the model
    # as a model cond, batched like the prompt: in the conditional rows it equals the superclass prompt typed
    # into CLIPTextEncode ("a star on the grass"), and differs from the prompt's own encoding
    assert r["encode_vs_clip_text_encode"] == 0.0
    assert r["superclass_vs_encode"] == 0.0 and r["superclass_vs_prompt"] > 0.1
    # the negative from CLIPTextEncode carries none: cond and uncond are separate batches, the cond ones global
    assert r["calls"] == 2 * calls and r["superclass_calls"] == calls
    # keys W(e_super − sim(e_super) i*) + σ(...) o*_K from the superclass encoding, values from the prompt (float64)
    assert r["k_err"] < FP32 and r["v_err"] < FP32
    assert r["out_vs_attention"] == 0.0  # ComfyUI's attention on exactly those keys and values
    assert r["finite"] and r["vs_local"] > 1e-2  # global differs from local
    # local locking ignores the carried encoding: bit-identical when cond and uncond share a batch (both encoded
    # by the node); with only the positive from it they are sampled apart (batch numerics, not the edit)
    assert r["local_both_encoded_vs_local"] == 0.0 and r["local_with_encode_node_vs_local"] < 1e-2
    # global locking on a prompt from plain CLIPTextEncode: local keys, and one warning naming the encode node
    assert r["without_encoding_vs_local"] == 0.0
    assert len(r["warnings"]) == 1 and "attnproc: concept encode" in r["warnings"][0]


def test_keylock_node_global_locking_takes_keys_from_the_superclass_encoding(steer):
    _global_locking_checks(steer["keylock"]["global"], calls=28)


def test_sdxl_concept_token_through_comfyuis_sdxl_embeddings(steer):
    r = steer["keylock_sdxl"]
    # the concept's two rows (CLIP-L 32 then OpenCLIP-G 48 here) written as ComfyUI's SDXL embedding file
    assert r["embedding_file_keys"] == ["clip_g", "clip_l"] and r["rows_are_the_concepts"] == [True, True]
    assert r["embedding_positions"] == [[2], [2]] and r["context_width"] == 80


def test_sdxl_keylock_node_matches_the_formula(steer):
    r = steer["keylock_sdxl"]
    assert r["blocks"] == 8  # the tiny SDXL: no transformer at the first level, 2 blocks per transformer after
    local = r["local"]
    assert local["calls"] == 32 and local["k_err"] < FP32 and local["v_err"] < FP32  # 8 blocks x 4 steps
    assert local["out_vs_attention"] == 0.0 and local["finite"] and local["vs_stock"] > 1e-3
    assert abs(local["token_open"] - (1 - 0.8808)) < 1e-3 and abs(local["token_closed"] - 0.8808) < 1e-3
    _global_locking_checks(r["global"], calls=32)


def test_real_sdxl_cross_attention_modules_map_onto_comfyuis_unet(steer):
    # SDXL at its real size on the meta device: diffusers' 70 attn2 names each find their own ComfyUI block
    assert steer["keylock_sdxl"]["real_sdxl"] == {"diffusers_attn2": 70, "comfy_blocks": 70, "mapped": 70,
                                                  "distinct_blocks": 70}


def test_sd15_and_sdxl_concepts_are_refused_on_each_other(steer):
    e = steer["keylock_sdxl"]["errors"]
    assert "is for a 64-wide text context, this model's cross-attention takes 80" in e["sd15_on_sdxl"]
    assert "is for a 80-wide text context, this model's cross-attention takes 64" in e["sdxl_on_sd15"]
    assert "64-value token embedding, this CLIP's text encoders take 32 (clip_l) + 48 (clip_g)" in \
        e["sd15_on_sdxl_clip"]
    assert "80-value token embedding, this CLIP's text encoders take 64 (clip_l)" in e["sdxl_on_sd15_clip"]
    assert e["models_untouched"] is True


# ---- SD 2.x (clip_h): a concept made by our diffusers path on the tiny SD 2.x pipeline (comfy_keylock_sd2.py) ----
def test_sd2_model_and_clip_carry_the_diffusers_weights(steer):
    r = steer["keylock_sd2"]
    assert (r["model_class"], r["model_type"]) == ("BaseModel", "V_PREDICTION")  # ComfyUI's SD20 class, v-prediction
    assert r["unet_vs_diffusers"] == 0.0 and r["unet_scale"] > 0.1  # ComfyUI's UNet is the diffusers one, exactly
    # the concept's row written in ComfyUI's SD 2.x embedding format (key clip_h), found by 'embedding:sdtwo' at the
    # token's place; the whole context ComfyUI encodes (penultimate layer, final norm, '!' padding) is diffusers'
    assert r["embedding_file_keys"] == ["clip_h"] and r["row_is_the_concepts"] is True
    assert r["embedding_positions"] == r["diffusers_position"] == [4] and r["context_width"] == 48
    assert r["encode_vs_diffusers"] == 0.0


def test_sd2_keylock_node_matches_the_formula(steer):
    r = steer["keylock_sd2"]
    local = r["local"]  # patched, so the file's diffusers model fingerprint matched ComfyUI's weights
    assert r["concept_has_model_fingerprint"] is True
    assert local["calls"] == 28 and local["k_err"] < FP32 and local["v_err"] < FP32  # 7 blocks x 4 steps
    assert local["out_vs_attention"] == 0.0 and local["finite"] and local["vs_stock"] > 1e-3
    assert abs(local["token_open"] - (1 - 0.8808)) < 1e-3 and abs(local["token_closed"] - 0.8808) < 1e-3
    _global_locking_checks(r["global"], calls=28)


def test_sd2_superclass_encoding_follows_clip_set_last_layer(steer):
    r = steer["keylock_sd2"]["last_layer"]  # CLIPSetLastLayer(-3) before the concept encode node
    assert r["encode_vs_clip_text_encode"] == 0.0 and r["prompt_vs_default_layer"] > 0.1
    assert r["superclass_vs_clip_text_encode"] == 0.0 and r["superclass_vs_default_layer"] > 0.1


def test_real_sd2_cross_attention_modules_map_onto_comfyuis_unet(steer):
    # SD 2.1 at its real size on the meta device: diffusers' 16 attn2 names each find their own ComfyUI block
    assert steer["keylock_sd2"]["real_sd2"] == {"diffusers_attn2": 16, "comfy_blocks": 16, "mapped": 16,
                                                "distinct_blocks": 16}


def test_sd15_sdxl_and_sd2_concepts_are_refused_on_each_other(steer):
    e = steer["keylock_sd2"]["errors"]
    for name, (got, wanted) in {"sd15_on_sd2": (64, 48), "sdxl_on_sd2": (80, 48), "sd2_on_sd15": (48, 64),
                                "sd2_on_sdxl": (48, 80)}.items():
        assert f"is for a {got}-wide text context, this model's cross-attention takes {wanted}" in e[name]
    assert "64-value token embedding, this CLIP's text encoders take 48 (clip_h)" in e["sd15_on_sd2_clip"]
    assert "48-value token embedding, this CLIP's text encoders take 64 (clip_l)" in e["sd2_on_sd15_clip"]
    assert e["models_untouched"] is True
