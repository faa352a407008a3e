"""The steering-edit nodes (workflows/comfy_steer.py) inside the real ComfyUI engine: run by comfy_engine.py's
``steer`` section (``steer_checks``), in its subprocess, on its tiny SD1.x UNet and tiny CLIP. Measurements go
into ``results``; tests/workflows/test_comfy_steer.py asserts on them."""
import json
import math

import torch

import comfy.ldm.modules.attention as attention
import nodes

PROMPT = "a red circle and a blue square"
STEPS = 4


def error_of(call, *args, exc=ValueError, **kwargs) -> str:
    """The message of the ``exc`` that ``call(*args, **kwargs)`` raises, or ``"accepted"``."""
    try:
        call(*args, **kwargs)
    except exc as e:
        return str(e)
    return "accepted"


def _attend64(q, k, v, heads):
    """Softmax attention in float64 from its definition: ``[R, S, H·D]`` rows → ``[R, S, H·D]``."""
    split = lambda t: t.double().reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    return (p @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _project64(linear, ctx):
    out = ctx.double() @ linear.weight.double().T
    return out + linear.bias.double() if linear.bias is not None else out


def structured_reference(q, k, v, module, full, alone, alignments, mode, heads):
    """StructureDiffusion's combination for conditional rows ``q, k, v`` (keys/values of the prompt), written
    from docs/structured.md in float64: values mode ``attn(Q, K_c, mean(V_c, V_ĉ1 … V_ĉk))``; conjunction mode
    ``mean_i attn(Q, K_i, V_ĉall)`` over ``K_c, K_ĉ1 … K_ĉk``."""
    def swapped(indices):
        ctx = full.double().clone()
        for i in indices:
            dst, src = alignments[i]
            ctx[dst] = alone[i].double()[src]
        return ctx

    each = [swapped([i]) for i in range(len(alone))]
    rows = q.shape[0]
    if mode == "values":
        vals = [v.double()] + [_project64(module.to_v, c).expand(rows, -1, -1) for c in each]
        return _attend64(q, k, torch.stack(vals).mean(0), heads)
    v_all = _project64(module.to_v, swapped(range(len(alone)))).expand(rows, -1, -1)
    keys = [k.double()] + [_project64(module.to_k, c).expand(rows, -1, -1) for c in each]
    return torch.stack([_attend64(q, kk, v_all, heads) for kk in keys]).mean(0)


def structured_checks(results, tiny_unet, tiny_clip, diff):
    from attnproc.steer.phrases import locate_phrases
    from attnproc.workflows.comfy_steer import bind_phrases, encode, patch_structured

    model, clip = tiny_unet(), tiny_clip(64)
    located = locate_phrases(PROMPT, ["a red circle", "a blue square"])
    results["structured_alignments"] = bind_phrases(clip, PROMPT, located)
    (positive,) = nodes.CLIPTextEncode().encode(clip, PROMPT)
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, 16, 24)}

    def run(m, pos=positive):
        (out,) = nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "simple", pos, negative, latent)
        return out["samples"]

    stock = run(model)
    full = encode(clip, PROMPT)
    alone = [encode(clip, p.text) for p in located]
    for mode in ("values", "conjunction"):
        patched = patch_structured(model, clip, PROMPT, "", "rules", mode, 0.5)
        replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        seen = {"steered": 0, "passed": 0, "rows_vs_stock": 0.0, "passed_vs_stock": 0.0, "vs_reference": 0.0,
                "steps": set(), "blocks": len(replace)}

        def recording(inner):
            def call(q, k, v, extra):
                out = inner(q, k, v, extra)
                stock_out = attention.optimized_attention(q, k, v, extra["n_heads"], transformer_options=extra)
                chunks = extra["cond_or_uncond"]
                n = q.shape[0] // len(chunks)
                cond = [i * n + r for i, c in enumerate(chunks) if c == 0 for r in range(n)]
                other = [r for r in range(q.shape[0]) if r not in cond]
                if inner.active(extra):
                    seen["steered"] += 1
                    seen["steps"].add(float(extra["sigmas"][0]))
                    ref = structured_reference(q[cond], k[cond], v[cond], inner.module, full, alone,
                                               results["structured_alignments"], mode, extra["n_heads"])
                    err = float((out[cond].double() - ref).abs().max() / ref.abs().max())
                    seen["vs_reference"] = max(seen["vs_reference"], err)
                    seen["rows_vs_stock"] = max(seen["rows_vs_stock"], diff(out[other], stock_out[other]))
                else:
                    seen["passed"] += 1
                    seen["passed_vs_stock"] = max(seen["passed_vs_stock"], diff(out, stock_out))
                return out
            return call

        for key in list(replace):
            replace[key] = recording(replace[key])
        out = run(patched)
        seen["steps"] = len(seen["steps"])
        results[f"structured_{mode}"] = {**seen, "vs_stock": diff(out, stock),
                                         "finite": bool(torch.isfinite(out).all())}
    # only cross-attention is replaced: with active_steps=0 the sample is the stock one, bit for bit
    results["structured_inactive_vs_stock"] = diff(run(patch_structured(model, clip, PROMPT, active_steps=0.0)),
                                                   stock)
    errors = {}
    for name, kwargs in {"missing": {"phrases": "a green circle"},
                         "overlap": {"phrases": "a red circle; red circle and"},
                         "weights": {"prompt": "a (red:1.2) circle and a blue square", "phrases": "a blue square"},
                         "mode": {"mode": "both"}, "steps": {"active_steps": 1.5}}.items():
        args = {"prompt": PROMPT, **kwargs}
        errors[name] = error_of(patch_structured, model, clip, **args)
    (other,) = nodes.CLIPTextEncode().encode(clip, "a blue circle and a red square")
    errors["other_prompt"] = error_of(run, patch_structured(model, clip, PROMPT), other, exc=RuntimeError)
    errors["model_untouched"] = "patches_replace" not in model.model_options.get("transformer_options", {})
    results["structured_errors"] = errors


REFERENCES = ["a red star", "a blue square"]
SCENE = "a red star and a blue square"
SUBJECTS = [{"phrase": "red star", "box": [0.05, 0.25, 0.45, 0.75]},
            {"phrase": "blue square", "box": [0.55, 0.25, 0.95, 0.75]}]


def isolate_checks(results, tiny_unet, tiny_clip, diff):
    """A two-subject story in one batch [ref 1, ref 2, scene]: each reference against sampling it alone with
    the same noise (ComfyUI's ``batch_index``), the scene against stock; wrong inputs."""
    import json

    from attnproc.workflows.comfy_steer import patch_isolate

    model, clip = tiny_unet(), tiny_clip(64)
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    negative = encode("")

    def run(m, positive, indices):
        latent = {"samples": torch.zeros(len(indices), 4, 16, 24), "batch_index": list(indices)}
        (out,) = nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "simple", positive, negative, latent)
        return out["samples"]

    refs = "\n".join(REFERENCES)
    patched = patch_isolate(model, clip, refs, SCENE, json.dumps(SUBJECTS), dropout=0.0)
    story = run(patched, encode(SCENE), [0, 1, 2])
    alone = [run(model, encode(r), [i]) for i, r in enumerate(REFERENCES)]
    scene_alone = run(model, encode(SCENE), [2])
    r = {"references_vs_alone": [diff(story[i:i + 1], alone[i]) for i in range(2)],
         "scene_vs_stock": diff(story[2:], scene_alone), "finite": bool(torch.isfinite(story).all())}
    # without reposition, isolation and mutual cross-attention the node changes nothing
    off = patch_isolate(model, clip, refs, SCENE, json.dumps(SUBJECTS), reposition=False, isolation=False,
                        mutual_cross=False)
    plain = run(off, encode(SCENE), [0, 1, 2])  # the same batch, each image with its prompt, nothing edited
    r["references_vs_plain_batch"] = [diff(story[i:i + 1], plain[i:i + 1]) for i in range(2)]
    r["plain_batch_vs_alone"] = [diff(plain[i:i + 1], alone[i]) for i in range(2)] + [diff(plain[2:], scene_alone)]
    r["scene_vs_plain_batch"] = diff(story[2:], plain[2:])
    # masks from the model's own attention (no boxes): the phrases' tokens found with the CLIP's tokenizer
    auto = patch_isolate(model, clip, refs, SCENE, json.dumps([{"phrase": s["phrase"]} for s in SUBJECTS]))
    auto_story = run(auto, encode(SCENE), [0, 1, 2])
    r["auto_masks"] = {"references_vs_plain_batch": [diff(auto_story[i:i + 1], plain[i:i + 1]) for i in range(2)],
                       "scene_vs_plain_batch": diff(auto_story[2:], plain[2:]),
                       "finite": bool(torch.isfinite(auto_story).all())}
    # ComfyUI's own numerics: the stock model on a batch of 3 (scene prompt) against the scene sampled alone
    r["stock_batch_vs_alone"] = diff(run(model, encode(SCENE), [0, 1, 2])[2:], scene_alone)
    errors = {}
    for name, (args, kwargs) in {
            "more_subjects": ((REFERENCES[0], SCENE, json.dumps(SUBJECTS)), {}),
            "box": ((refs, SCENE, json.dumps([SUBJECTS[0], {"phrase": "blue square", "box": [0.5, 0.2, 1.4, 0.6]}])),
                    {}),
            "phrase": ((refs, SCENE, json.dumps([SUBJECTS[0], {"phrase": "green circle", "box": [0, 0, 1, 1]}])), {}),
            "json": ((refs, SCENE, "[{'phrase': 'red star'}"), {}),
            "option": ((refs, SCENE, json.dumps(SUBJECTS)), {"mutual_lambda": 2.0})}.items():
        errors[name] = error_of(patch_isolate, model, clip, *args, **kwargs)
    for name, (positive, indices) in {"batch": (encode(SCENE), [0, 1]),
                                      "positive": (encode("a green circle"), [0, 1, 2])}.items():
        errors[name] = error_of(run, patched, positive, indices)
    errors["model_untouched"] = "patches_replace" not in model.model_options.get("transformer_options", {})
    r["errors"] = errors
    results["isolate"] = r


def keylock_reference(e, weight, i_star, o_star, c_inv, beta, tau):
    """One concept's edited projection, in float64 from docs/perfusion.md:
    ``W·(e − sim(e)·i*) + σ((sim(e) − β)/τ)·o*``, ``sim(e) = eᵀC⁻¹i* / (i*ᵀC⁻¹i*)``."""
    e, w, i, o, ci = (t.double() for t in (e, weight, i_star, o_star, c_inv))
    sim = (e @ (ci @ i)) / (i @ ci @ i)
    return (e - sim[..., None] * i) @ w.T + torch.sigmoid((sim - beta) / tau)[..., None] * o


def mixed_key_reference(e, weight, i_star, o_star, c_inv, beta, tau):
    """``keys="mixed"`` in float64: ``(W e + g·o*) / (1 + g)``, ``g = σ((sim(e) − β)/τ)``."""
    e, w, i, o, ci = (t.double() for t in (e, weight, i_star, o_star, c_inv))
    g = torch.sigmoid(((e @ (ci @ i)) / (i @ ci @ i) - beta) / tau)[..., None]
    return (e @ w.T + g * o) / (1 + g)


def make_concept(model, clip, work, token="<tri>", prompt="a embedding:tri on the grass", superclass="star"):
    """A concept file for a tiny UNet laid out as our diffusers path writes it (one token row per text encoder,
    concatenated in encoder order: SDXL's CLIP-L then OpenCLIP-G; ``i*`` of the concatenated context; random o*_K,
    o*_V for the diffusers names of the cross-attention modules; i* = the concept token's own encoding in
    ``prompt``, so sim = 1 there) and a covariance file, in ``work``. Returns ``(concept, path, covariance path,
    C⁻¹, the concept clip, the token's position)``."""
    import os

    import comfy.utils

    from attnproc.pipelines.concepts import Concept, _digest, save_concept, save_covariance
    from attnproc.workflows.comfy_steer import (_embedding_width, _hf_tokenizers, block_key, concept_clip,
                                                embedding_name, transformer_blocks)

    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    names = [k[:-len(".to_k.weight")] for k in mapping if k.endswith("attn2.to_k.weight")]
    blocks = transformer_blocks(model.model.diffusion_model)
    modules = {n: blocks[block_key(mapping[n + ".to_k.weight"])].attn2 for n in names}
    width = next(iter(modules.values())).to_k.in_features
    rows = sum(_embedding_width(clip, key, inner) for key, inner in _hf_tokenizers(clip).items())
    g = torch.Generator().manual_seed(7)
    embedding = torch.randn(rows, generator=g) * 0.5
    concept = Concept(token=token, superclass=superclass, embedding=embedding, i_star=torch.zeros(width),
                      keys={n: torch.randn(modules[n].to_k.weight.shape[0], generator=g) for n in names},
                      values={n: torch.randn(modules[n].to_v.weight.shape[0], generator=g) for n in names})
    concept.model = _digest((f"{n}.{p}", getattr(modules[n], p).weight) for n in names for p in ("to_k", "to_v"))
    c_mat = torch.randn(width, width, generator=g, dtype=torch.float64)
    c_mat = c_mat @ c_mat.T / width + 0.1 * torch.eye(width, dtype=torch.float64)
    cov = save_covariance(c_mat, os.path.join(work, "C.safetensors"), text_encoder="", captions=0, ridge=0.1)
    cclip = concept_clip(clip, [concept], folder=work)
    tokens = cclip.tokenize(prompt)
    at = [i for i, t in enumerate(tokens["l"][0]) if torch.is_tensor(t[0])]
    concept.i_star = cclip.encode_from_tokens(tokens)[0].float()[at[0]].clone()
    path = save_concept(concept, os.path.join(work, f"{embedding_name(token)}.safetensors"))
    return concept, path, cov, torch.linalg.inv(c_mat), cclip, at


def record_keylock(patched, concept, c_inv, beta, tau, at, diff, superclass_ref=None, mixed=False):
    """Wrap every attn2 replacement of a keylock-patched model: each call's keys and values against the float64
    formula (keys from the superclass encoding the call carries, for global locking; else from its own context),
    the output against ComfyUI's attention on the edited keys and values, and (``superclass_ref``) the carried
    superclass encoding of the conditional rows against the superclass prompt encoded by CLIPTextEncode.
    ``mixed``: the keys against ``keys="mixed"``'s formula instead."""
    from attnproc.workflows.comfy_steer import SUPERCLASS_KEY

    replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    seen = {"calls": 0, "k_err": 0.0, "v_err": 0.0, "superclass_calls": 0}

    def recording(inner):
        def call(q, k, v, extra):
            e_call = extra["attnproc_text_context"]
            sup = extra.get(SUPERCLASS_KEY)
            cond = [i for i, c in enumerate(extra["cond_or_uncond"]) if c == 0]  # batch 1 per chunk
            key_ctx = e_call
            if sup is not None and inner.method.config.locking == "global":
                seen["superclass_calls"] += 1
                key_ctx = sup
                if superclass_ref is not None and cond:
                    seen["superclass_vs_encode"] = max(seen.get("superclass_vs_encode", 0.0),
                                                       diff(sup[cond], superclass_ref.expand(len(cond), -1, -1)))
                    seen["superclass_vs_prompt"] = max(seen.get("superclass_vs_prompt", 0.0),
                                                       diff(sup[cond], e_call[cond]))
            mod = inner.module
            reference = mixed_key_reference if mixed else keylock_reference
            ks = reference(key_ctx, mod.to_k.weight, concept.i_star, inner.o_k[0], c_inv, beta, tau)
            vs = keylock_reference(e_call, mod.to_v.weight, concept.i_star, inner.o_v[0], c_inv, beta, tau)
            new_k = inner.method.project_keys(inner.key_context(e_call, extra), mod.to_k, inner.o_k)
            new_v = inner.method.project(e_call, mod.to_v, inner.o_v)
            seen["k_err"] = max(seen["k_err"], float((new_k.double() - ks).abs().max() / ks.abs().max()))
            seen["v_err"] = max(seen["v_err"], float((new_v.double() - vs).abs().max() / vs.abs().max()))
            if cond and key_ctx is e_call and not mixed:  # at the concept token: gate open → o*_K, closed → 0 (sim = 1)
                o_k = inner.o_k[0].to(new_k)
                at_token = new_k[cond][:, at[0]]
                seen["token_open"] = max(seen.get("token_open", 0.0),
                                         float((at_token - o_k).abs().max() / o_k.abs().max()))
                seen["token_closed"] = max(seen.get("token_closed", 0.0), float(at_token.abs().max() / o_k.abs().max()))
            out = inner(q, k, v, extra)
            expect = attention.optimized_attention(q, new_k.to(k), new_v.to(v), extra["n_heads"],
                                                   transformer_options=extra)
            seen["out_vs_attention"] = max(seen.get("out_vs_attention", 0.0), diff(out, expect))
            seen["calls"] += 1
            return out
        return call

    for key in list(replace):
        replace[key] = recording(replace[key])
    return seen


def keylock_checks(results, tiny_unet, tiny_clip, diff, work):
    """A concept for the tiny UNet, its token through ComfyUI's embedding mechanism, the node's K/V against the
    formula with the gate forced open and closed, global locking through the concept encode node, and files for
    another model."""
    import os

    from attnproc.pipelines.concepts import Concept, save_concept
    from attnproc.workflows.comfy_steer import concept_encode, patch_keylock

    model, clip = tiny_unet(), tiny_clip(64)
    prompt = "a embedding:tri on the grass"
    concept, path, cov, c_inv, cclip, at = make_concept(model, clip, work, "<tri>", prompt)
    tokens = cclip.tokenize(prompt)["l"][0]
    r = {"embedding_positions": at,
         "embedding_is_concept": torch.equal(tokens[at[0]][0].float(), concept.embedding.float()),
         "input_clip_unchanged": not any(torch.is_tensor(t[0]) for t in clip.tokenize(prompt)["l"][0])}
    (positive,) = nodes.CLIPTextEncode().encode(cclip, prompt)
    (negative,) = nodes.CLIPTextEncode().encode(cclip, "")
    latent = {"samples": torch.zeros(1, 4, 16, 24)}

    def run(m, pos=positive, neg=negative):
        (out,) = nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "simple", pos, neg, latent)
        return out["samples"]

    stock = run(model)
    outs = {}
    for name, (beta, tau) in {"open": (0.0, 0.01), "closed": (1.5, 0.01), "default": (0.7, 0.15)}.items():
        patched = patch_keylock(model, json.dumps([{"file": str(path), "beta": beta, "tau": tau}]), str(cov))
        seen = record_keylock(patched, concept, c_inv, beta, tau, at, diff)
        out = run(patched)
        r[name] = {**seen, "vs_stock": diff(out, stock), "finite": bool(torch.isfinite(out).all())}
        outs[name] = out
    patched = patch_keylock(model, str(path), str(cov), keys="mixed")  # the keys option reaches the node
    seen = record_keylock(patched, concept, c_inv, 0.7, 0.15, at, diff, mixed=True)
    out = run(patched)
    r["mixed"] = {**seen, "vs_locked": diff(out, outs["default"]), "finite": bool(torch.isfinite(out).all())}
    r["global"] = keylock_global(model, clip, cclip, concept, path, cov, c_inv, at, diff, run, prompt,
                                 "a star on the grass")
    errors = {}
    other = Concept(**{**concept.__dict__, "model": "0123456789abcdef"})
    other_path = save_concept(other, os.path.join(work, "other.safetensors"))
    wrong = Concept(**{**concept.__dict__, "keys": {"down_blocks.9.attentions.0.transformer_blocks.0.attn2":
                                                    torch.zeros(32)},
                       "values": {"down_blocks.9.attentions.0.transformer_blocks.0.attn2": torch.zeros(32)}})
    wrong_path = save_concept(wrong, os.path.join(work, "wrong.safetensors"))
    for name, (concepts, cov_path, opts) in {
            "other_model": (str(other_path), str(cov), {}), "architecture": (str(wrong_path), str(cov), {}),
            "beta": (json.dumps([{"file": str(path), "beta": 3.0}]), str(cov), {}),
            "covariance": (str(path), "", {}), "missing_file": (str(path) + ".nope", str(cov), {}),
            "locking": (str(path), str(cov), {"locking": "both"})}.items():
        errors[name] = error_of(patch_keylock, model, concepts, cov_path, **opts)
    errors["model_untouched"] = "patches_replace" not in model.model_options.get("transformer_options", {})
    two_words = save_concept(Concept(**{**concept.__dict__, "superclass": "snow leopard"}),
                             os.path.join(work, "two_words.safetensors"))
    errors["encode_two_word_superclass"] = error_of(concept_encode, clip, str(two_words), prompt)
    errors["encode_no_concepts"] = error_of(concept_encode, clip, "", prompt)
    r["errors"] = errors
    results["keylock"] = r


def keylock_local_and_global(model, clip, cclip, concept, path, cov, c_inv, at, diff, positive, negative, prompt,
                             superclass_prompt):
    """The keylock node at the reference defaults, sampled through ComfyUI's KSampler: local locking (the recorded
    K/V against the formula, the output against the stock model's) and :func:`keylock_global`."""
    from attnproc.workflows.comfy_steer import patch_keylock

    latent = {"samples": torch.zeros(1, 4, 16, 24)}

    def run(m, pos=positive, neg=negative):
        (out,) = nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "simple", pos, neg, latent)
        return out["samples"]

    stock = run(model)
    patched = patch_keylock(model, str(path), str(cov))
    seen = record_keylock(patched, concept, c_inv, 0.7, 0.15, at, diff)
    out = run(patched)
    local = {**seen, "vs_stock": diff(out, stock), "finite": bool(torch.isfinite(out).all())}
    return local, keylock_global(model, clip, cclip, concept, path, cov, c_inv, at, diff, run, prompt,
                                 superclass_prompt)


def keylock_global(model, clip, cclip, concept, path, cov, c_inv, at, diff, run, prompt, superclass_prompt):
    """Global locking at the reference defaults: the positive from the concept encode node (it carries the
    superclass encoding), the negative from CLIPTextEncode (none: its own keys); plus what the same positive
    gives under local locking (the carried encoding is then unused) and a positive without the superclass
    encoding (its keys stay local, with one warning)."""
    import logging

    from attnproc.workflows.comfy_steer import concept_encode, patch_keylock

    positive = concept_encode(clip, str(path), prompt)
    (reference,) = nodes.CLIPTextEncode().encode(clip, superclass_prompt)  # the superclass word typed as text
    (plain_positive,) = nodes.CLIPTextEncode().encode(cclip, prompt)
    local = patch_keylock(model, str(path), str(cov))
    local_out = run(local, plain_positive)
    # the encode node's conditioning is CLIPTextEncode's; with the negative encoded by it too, cond and uncond stay
    # in one batch and local locking is bit-identical (with only the positive, they run apart: batch numerics)
    r = {"encode_vs_clip_text_encode": diff(positive[0][0], plain_positive[0][0]),
         "local_both_encoded_vs_local": diff(run(local, positive, concept_encode(clip, str(path), "")), local_out),
         "local_with_encode_node_vs_local": diff(run(local, positive), local_out)}
    patched = patch_keylock(model, str(path), str(cov), locking="global")
    seen = record_keylock(patched, concept, c_inv, 0.7, 0.15, at, diff, superclass_ref=reference[0][0])
    out = run(patched, positive)
    r.update(seen, vs_local=diff(out, local_out), finite=bool(torch.isfinite(out).all()))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        r["without_encoding_vs_local"] = diff(run(patch_keylock(model, str(path), str(cov), locking="global"),
                                                  plain_positive), local_out)
    finally:
        logging.getLogger().removeHandler(handler)
    r["warnings"] = [rec.getMessage() for rec in records if "keylock node" in rec.getMessage()]
    return r


def tiny_sdxl_unet(tiny_unet, context: int):
    """A tiny SDXL UNet (ComfyUI's SDXL class and ADM: the pooled clip_g output and 6 size embeddings) with
    SDXL's layout in miniature: no transformer at the first level, 2 transformer blocks per transformer after."""
    return tiny_unet("SDXL", use_linear_in_transformer=True, adm_in_channels=48 + 6 * 256, num_classes="sequential",
                     model_channels=64, context_dim=context, transformer_depth=[0, 2],
                     transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2)


def keylock_sdxl_checks(results, tiny_unet, tiny_clip, tiny_sdxl_clip, diff, work):
    """The keylock node on SDXL: ComfyUI's SDXL CLIP (clip_l + clip_g) takes the concept's two token rows as
    ComfyUI's own SDXL embedding file (clip_l/clip_g keys), K/V against the formula (local and global), and
    SD 1.5 concepts refused on SDXL (and the reverse) before anything is patched."""
    import os

    from attnproc.pipelines.concepts import load_concept
    from attnproc.workflows.comfy_steer import concept_blocks, concept_clip, concept_encode, patch_keylock

    clip = tiny_sdxl_clip()
    model = tiny_sdxl_unet(tiny_unet, 80)
    prompt = "a embedding:sdxltri on the grass"
    os.makedirs(os.path.join(work, "sdxl"), exist_ok=True)
    concept, path, cov, c_inv, cclip, at = make_concept(model, clip, os.path.join(work, "sdxl"), "<sdxltri>", prompt)
    tokens = cclip.tokenize(prompt)
    at_g = [i for i, t in enumerate(tokens["g"][0]) if torch.is_tensor(t[0])]
    import safetensors.torch

    stored = safetensors.torch.load_file(os.path.join(work, "sdxl", "attnproc_concepts",
                                                      os.listdir(os.path.join(work, "sdxl", "attnproc_concepts"))[0],
                                                      "sdxltri.safetensors"))
    r = {"blocks": len(concept_blocks(model, [concept])), "embedding_positions": [at, at_g],
         "embedding_file_keys": sorted(stored),
         "rows_are_the_concepts": [torch.equal(tokens["l"][0][at[0]][0].float(), concept.embedding[:32]),
                                   torch.equal(tokens["g"][0][at_g[0]][0].float(), concept.embedding[32:])],
         "context_width": int(concept.i_star.numel())}
    (negative,) = nodes.CLIPTextEncode().encode(cclip, "")
    (positive,) = nodes.CLIPTextEncode().encode(cclip, prompt)
    r["local"], r["global"] = keylock_local_and_global(model, clip, cclip, concept, path, cov, c_inv, at, diff,
                                                       positive, negative, prompt, "a star on the grass")
    # SD 1.5 concept (64-wide, SD 1.5 module names) on SDXL, and the SDXL concept on SD 1.5
    sd15, sd15_clip = tiny_unet(), tiny_clip(64)
    sd15_concept, sd15_path, sd15_cov, *_ = make_concept(sd15, sd15_clip, work, "<tri15>", "a embedding:tri15 here")
    r["errors"] = {"sd15_on_sdxl": error_of(patch_keylock, model, str(sd15_path), str(sd15_cov)),
                   "sdxl_on_sd15": error_of(patch_keylock, sd15, str(path), str(cov)),
                   "sd15_on_sdxl_clip": error_of(concept_clip, clip, str(sd15_path), folder=work),
                   "sdxl_on_sd15_clip": error_of(concept_encode, sd15_clip, str(path), prompt),
                   "models_untouched": all("patches_replace" not in m.model_options.get("transformer_options", {})
                                           for m in (model, sd15))}
    assert load_concept(path).embedding.numel() == 80
    r["real_sdxl"] = real_sdxl_blocks()
    results["keylock_sdxl"] = r


def real_sdxl_blocks() -> dict:
    """SDXL at its real size, built on the meta device (no weights): the 70 cross-attention modules of diffusers'
    UNet (the names our concept files store) found in ComfyUI's SDXL UNet through ComfyUI's key map, each at its
    own transformer block."""
    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
              "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
              "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
              "use_temporal_attention": False, "use_temporal_resblock": False}  # ComfyUI's SDXL (model_detection)
    unet = dict(block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    return real_blocks("SDXL", config, unet, embedding=768 + 1280)


def real_blocks(comfy_class: str, config: dict, unet_config: dict, embedding: int) -> dict:
    """A model at its real size on the meta device (no weights): the cross-attention modules of diffusers' UNet
    (``unet_config``; the names our concept files store) found in ComfyUI's UNet (``comfy.supported_models.<class>``
    with ``config``, as ComfyUI's model detection makes it) through ComfyUI's key map, each at its own block."""
    import types

    import comfy.supported_models
    from diffusers import UNet2DConditionModel

    from attnproc.pipelines.concepts import Concept, cross_attention_modules
    from attnproc.workflows.comfy_steer import concept_blocks, transformer_blocks

    base = getattr(comfy.supported_models, comfy_class)(config).get_model({}, device=torch.device("meta"))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    mods = cross_attention_modules(unet)
    concept = Concept(token="<c>", superclass="teddy", embedding=torch.zeros(embedding),
                      i_star=torch.zeros(unet_config["cross_attention_dim"]),
                      keys={n: torch.zeros(1) for n, _ in mods}, values={n: torch.zeros(1) for n, _ in mods})
    found = concept_blocks(types.SimpleNamespace(model=base), [concept])
    return {"diffusers_attn2": len(mods), "comfy_blocks": len(transformer_blocks(base.diffusion_model)),
            "mapped": len(found), "distinct_blocks": len({key for key, _ in found.values()})}
