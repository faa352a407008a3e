"""``attnproc finetune``: config errors by field, distillation steps, kill + resume = uninterrupted, LoRA export."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from attnproc.workflows.cli import main as cli_main
from attnproc.workflows.finetune import (
    FinetuneConfigError,
    load_finetune_config,
    parse_finetune_config,
    record_calls,
    sample_time,
    sampler_steps,
    finetune,
)

BASE = dict(pipeline="tiny:wan21", method="radial", options=dict(dense_first_steps=0, dense_first_layers=0),
            train="lora", steps=4, lr=1e-3, checkpoint_every=2, lora_rank=2, data_steps=1, seed=3)


@pytest.mark.parametrize("change,match", [
    (dict(epochs=3), r"epochs: unknown field; valid fields: pipeline"),
    (dict(train="adapters"), r"train: must be one of method, lora, full, got 'adapters'"),
    (dict(lr=0), r"lr: must be > 0"),
    (dict(steps=0), r"steps: must be an integer >= 1"),
    (dict(method="nope"), r"method: unknown method 'nope'"),
    (dict(options=dict(decay=-1)), r"options: .*decay"),
    (dict(lora_targets="to_q"), r"lora_targets: must be a non-empty list"),
    (dict(prompt=["a red circle", 3]), r"prompt: must be a string or a non-empty list of strings"),
    (dict(gradient_checkpointing="yes"), r"gradient_checkpointing: must be true or false"),
    (dict(data="latents"), r"data: must be one of noised, trajectory, on_policy, got 'latents'"),
    (dict(data="on_policy", refresh_every=0), r"refresh_every: must be an integer >= 1"),
    (dict(data="on_policy", refresh_every=3, checkpoint_every=2),
     r"checkpoint_every: must be a multiple of refresh_every \(3\) with data: on_policy, got 2"),
    (dict(step_weights=[1, 2]), r"step_weights: needs data: trajectory or on_policy"),
    (dict(data="trajectory", step_weights=[0, 0]), r"step_weights: must be a list of numbers >= 0 .*not all 0"),
    (dict(data="trajectory", step_weights=[1, -1]), r"step_weights: must be a list of numbers >= 0"),
    (dict(data="on_policy", refresh_every=2, context_parallel="ulysses=2"), r"context_parallel: not supported with data: on_policy"),
    (dict(guidance_scale=3.0), r"guidance_scale: needs data: trajectory"),
    (dict(data="trajectory", guidance_scale="high"), r"guidance_scale: must be a number"),
    (dict(cooldown=5), r"cooldown: must be <= steps \(4\), got 5"),
    (dict(cooldown=-1), r"cooldown: must be an integer >= 0"),
])
def test_config_errors_name_the_field(tmp_path, change, match):
    with pytest.raises(FinetuneConfigError, match=match):
        parse_finetune_config(dict(BASE, output=str(tmp_path), **change))
    missing = {k: v for k, v in BASE.items() if k != "pipeline"}
    with pytest.raises(FinetuneConfigError, match="pipeline: missing"):
        parse_finetune_config(dict(missing, output=str(tmp_path)))


def test_config_file_yaml_and_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(dict(BASE, output="x")))
    assert load_finetune_config(tmp_path / "a.json").lora_rank == 2
    (tmp_path / "b.yaml").write_text("pipeline: tiny:wan21\nmethod: radial\noutput: x\nsteps: -1\n")
    with pytest.raises(FinetuneConfigError, match=r"b.yaml: steps: must be an integer >= 1"):
        load_finetune_config(tmp_path / "b.yaml")


def test_time_sampling_is_the_lognormal_flow_map():
    cfg = parse_finetune_config(dict(BASE, output="x", p_mean=0.0, p_std=1.0))
    t = sample_time(torch.Generator().manual_seed(0), 20000, cfg)
    # sigma = exp(N(0, 1)) -> t = sigma / (1 + sigma) has median 0.5 and lies in (0, 1)
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(t.median()) - 0.5) < 0.02


class Killed(Exception):
    pass


def killed_then_resumed(cfg, pipe_factory=None, at=3):
    """Run ``cfg`` until it is killed as step ``at`` ends (after the step-2 checkpoint, before the next: step 3
    is lost), then run it again: the resumed result. ``pipe_factory``: a fresh pipeline for each run."""
    def kill(step, loss):
        if step == at:
            raise Killed

    pipe = {} if pipe_factory is None else {"pipe": pipe_factory()}
    with pytest.raises(Killed):
        finetune(cfg, callback=kill, progress=False, **pipe)
    pipe = {} if pipe_factory is None else {"pipe": pipe_factory()}
    return finetune(cfg, progress=False, **pipe)


def test_kill_and_resume_give_the_uninterrupted_weights(tmp_path):
    whole = finetune(parse_finetune_config(dict(BASE, output=str(tmp_path / "whole"))), progress=False)
    assert whole.resumed_from == 0 and len(whole.losses) == 4
    cfg = parse_finetune_config(dict(BASE, output=str(tmp_path / "killed")))
    resumed = killed_then_resumed(cfg)
    assert resumed.resumed_from == 2
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.losses == whole.losses
    # training moved the adapters (lora_B starts at zero) and the checkpoint is gone only if never written
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)
    # a different config refuses the old checkpoint instead of mixing runs
    other = parse_finetune_config(dict(BASE, output=str(tmp_path / "killed"), lr=2e-3))
    with pytest.raises(ValueError, match="different fine-tuning config"):
        finetune(other, progress=False)
    # gradient checkpointing recomputes the forward: same losses and weights, less activation memory
    ckpt = finetune(parse_finetune_config(dict(BASE, steps=2, gradient_checkpointing=True,
                                               output=str(tmp_path / "gc"))), progress=False)
    assert ckpt.losses == whole.losses[:2]


def test_lora_export_loads_with_diffusers_and_cli_runs(tmp_path):
    from attnproc.pipelines import tiny_pipeline

    cfg_path = tmp_path / "train.json"
    cfg_path.write_text(json.dumps(dict(BASE, steps=2, output=str(tmp_path / "out"))))
    assert cli_main(["finetune", str(cfg_path), "--quiet"]) == 0
    trained = load_file(tmp_path / "out" / "weights.safetensors")
    pipe = tiny_pipeline("wan21", seed=0)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors", adapter_name="t")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert loaded
    for name, p in loaded.items():
        assert torch.equal(p.detach(), trained[name.replace(".t.", ".default.")]), name
    assert cli_main(["finetune", str(tmp_path / "absent.yaml")]) == 2


def test_explicit_parameters_train_and_a_method_without_parameters_is_refused(tmp_path):
    from attnproc.pipelines import tiny_pipeline

    pipe = tiny_pipeline("wan21", seed=0)
    before = pipe.transformer.proj_out.weight.detach().clone()
    cfg = parse_finetune_config(dict(BASE, steps=1, train="full", output=str(tmp_path / "p")))
    res = finetune(cfg, pipe=pipe, params=[("proj_out.weight", pipe.transformer.proj_out.weight)], progress=False)
    saved = load_file(res.weights)
    assert list(saved) == ["proj_out.weight"] and not torch.equal(saved["proj_out.weight"], before)
    from safetensors import safe_open

    with safe_open(str(res.weights), "pt") as f:  # the record of what the weights were trained under
        meta = f.metadata()
    assert (meta["train"], json.loads(meta["method"]), json.loads(meta["options"])) == ("full", "radial", BASE["options"])
    with pytest.raises(ValueError, match="train: method: method 'radial' owns no trainable parameters"):
        finetune(parse_finetune_config(dict(BASE, train="method", output=str(tmp_path / "m"))), progress=False)


def test_cooldown_lowers_the_last_rates_and_resumes_exactly(tmp_path):
    """cooldown: N: the rate falls linearly over the last N steps (from the step index, so a killed and resumed run
    trains with the same rates and ends with the same projections); it changes what the run learns."""
    from attnproc.workflows.finetune import step_lr

    sla = dict(BASE, method="sla", options=dict(topk=0.5), train="method", lr=1e-2)
    cfg = parse_finetune_config(dict(sla, cooldown=2, output=str(tmp_path / "whole")))
    assert [step_lr(cfg, i) for i in range(4)] == [1e-2, 1e-2, 1e-2, 5e-3]
    whole = finetune(cfg, progress=False)
    resumed = killed_then_resumed(parse_finetune_config(dict(sla, cooldown=2, output=str(tmp_path / "killed"))))
    constant = finetune(parse_finetune_config(dict(sla, output=str(tmp_path / "constant"))), progress=False)
    a, b, c = (load_file(r.weights) for r in (whole, resumed, constant))
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses[:3] == constant.losses[:3] and any(not torch.equal(a[k], c[k]) for k in a)
    # cooldown 1 leaves every rate at lr (the last step runs at lr * 1/1): the constant run's weights bit for bit,
    # which a rate taken one step late (lr * 0 on the last step) would not give
    one = finetune(parse_finetune_config(dict(sla, cooldown=1, output=str(tmp_path / "one"))), progress=False)
    d = load_file(one.weights)
    assert all(torch.equal(d[k], c[k]) for k in c)
    no_steps = {k: v for k, v in sla.items() if k != "steps"}  # checked against the default of 100 steps
    with pytest.raises(FinetuneConfigError, match=r"cooldown: must be <= steps \(100\), got 101"):
        parse_finetune_config(dict(no_steps, cooldown=101, output=str(tmp_path / "x")))


def test_sla_projections_train_resume_exactly_and_load_with_apply(tmp_path):
    """train: method on SLA trains its per-module proj_l only; a kill and a resume end with the uninterrupted
    run's projections, in the file apply(..., weights=) loads."""
    import attnproc
    from attnproc.pipelines import tiny_pipeline

    sla = dict(BASE, method="sla", options=dict(topk=0.5), train="method", lr=1e-2)
    whole = finetune(parse_finetune_config(dict(sla, output=str(tmp_path / "whole"))), progress=False)
    cfg = parse_finetune_config(dict(sla, output=str(tmp_path / "killed")))
    resumed = killed_then_resumed(cfg)
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert sorted(a) == sorted(f"transformer.blocks.{i}.attn1.{p}" for i in range(2) for p in ("weight", "bias"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(float(t.abs().max()) > 0 for t in a.values())  # trained away from the zero initialisation
    pipe = tiny_pipeline("wan21", seed=0)
    handle = attnproc.apply(pipe, "sla", topk=0.5, weights=str(whole.weights))
    loaded = handle.state_dict()
    for key, value in a.items():
        module, part = key.rsplit(".", 1)
        assert torch.equal(loaded[f"{module}.attnproc.sla.{part}"], value)
    handle.remove()


def test_vmoba_trains_through_lora(tmp_path):
    """VMoBA's sparse path has gradients: its LoRA adapters move and the distillation loss is finite."""
    cfg = dict(BASE, method="vmoba", options=dict(dense_first_steps=0, setting="training"), steps=2,
               checkpoint_every=2, output=str(tmp_path / "v"))
    res = finetune(parse_finetune_config(cfg), progress=False)
    saved = load_file(res.weights)
    assert all(math.isfinite(x) for x in res.losses)

    q_lora = [k for k in saved if ".attn1.to_q." in k and "lora_B" in k]  # moves only through attention's backward
    assert q_lora and all(float(saved[k].abs().max()) > 0 for k in q_lora)


@pytest.mark.parametrize("guidance", [None, 5.0])
def test_trajectory_data_is_the_samplers_calls_and_the_loss_the_guided_one(tmp_path, guidance):
    """data: trajectory trains on the dense sampler's own calls (one (cond, uncond) pair per sampler step); the
    first loss equals the hand-computed error of the guided prediction (or the mean over both calls)."""
    import attnproc
    from attnproc.pipelines import tiny_pipeline

    cfg = parse_finetune_config(dict(BASE, method="sla", options=dict(topk=0.5), train="method", steps=1, data_steps=3,
                                     data="trajectory", guidance_scale=guidance, output=str(tmp_path)))
    pipe = tiny_pipeline("wan21", seed=0)
    groups = sampler_steps(record_calls(pipe, cfg), 5.0)
    assert [len(g) for g in groups] == [2, 2, 2]
    ts = [float(g[0]["timestep"].flatten()[0]) for g in groups]
    assert ts == [float(t) for t in pipe.scheduler.timesteps] and ts[0] > ts[1] > ts[2]
    cond, uncond = groups[0]
    assert not torch.equal(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])
    pick = groups[int(torch.randint(len(groups), (1,), generator=torch.Generator().manual_seed(3 * 1_000_003)))]
    with torch.no_grad():
        dense = [pipe.transformer(**c, return_dict=False)[0] for c in pick]
        handle = attnproc.apply(pipe, "sla", topk=0.5)  # zero projections: what the student is before step 1
        sparse = [pipe.transformer(**c, return_dict=False)[0] for c in pick]
        handle.remove()
    if guidance is None:
        expected = sum(float(((s - d) ** 2).mean()) for s, d in zip(sparse, dense)) / 2
    else:
        g = [u + guidance * (c - u) for c, u in (dense, sparse)]
        expected = float(((g[1] - g[0]) ** 2).mean())
    res = finetune(cfg, pipe=tiny_pipeline("wan21", seed=0), progress=False)
    assert res.losses[0] == pytest.approx(expected, rel=1e-5)


def test_guided_loss_needs_pairs_of_calls():
    single = [dict(timestep=torch.tensor([t])) for t in (900, 500)]  # CFG batched into one call, or off
    assert [len(g) for g in sampler_steps(single, None)] == [1, 1]
    with pytest.raises(ValueError, match=r"guidance_scale: needs one conditional and one unconditional"):
        sampler_steps(single, 3.0)


def _guided_error(pipe, teacher, group, scale):
    with torch.no_grad():
        s = [pipe.transformer(**c, return_dict=False)[0] for c in group]
        t = [teacher(**c, return_dict=False)[0] for c in group]
    g = [u + scale * (c - u) for c, u in (s, t)]
    return float(((g[0] - g[1]) ** 2).mean())


def test_on_policy_trains_at_the_students_own_states_regenerated_with_its_weights(tmp_path):
    """data: on_policy: the loss of step n (n a refresh step, and the steps after it) is the guided error at a
    sampler step of the *student's* own generation with its weights at step n (noise from (seed, n)), not at the
    dense sampler's states; a kill and a resume give the uninterrupted run's projections."""
    import copy

    import attnproc
    from attnproc.pipelines import tiny_pipeline

    opts = dict(BASE, method="sla", options=dict(topk=0.5), train="method", lr=5e-2, steps=4, data_steps=3,
                data="on_policy", refresh_every=2, guidance_scale=5.0)
    cfg = parse_finetune_config(dict(opts, output=str(tmp_path / "whole")))
    pipe = tiny_pipeline("wan21", seed=0)
    weights = {}

    def snapshot(step, loss):
        weights[step] = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items() if ".attnproc." in k}

    whole = finetune(cfg, pipe=pipe, callback=snapshot, progress=False)
    fresh = tiny_pipeline("wan21", seed=0)
    teacher = copy.deepcopy(fresh.transformer).eval()
    dense_steps = sampler_steps(record_calls(fresh, cfg, seed=3 * 1_000_003 + 500_000_000), 5.0)
    handle = attnproc.apply(fresh, "sla", topk=0.5)
    for step in range(4):
        refresh = step - step % 2  # the trajectory was sampled with the weights after `refresh` steps
        if refresh:
            fresh.transformer.load_state_dict(weights[refresh], strict=False)
        own = sampler_steps(record_calls(fresh, cfg, seed=3 * 1_000_003 + refresh + 500_000_000), 5.0)
        if step == 0:  # the student's own states, not the dense sampler's (same noise)
            assert torch.equal(own[0][0]["hidden_states"], dense_steps[0][0]["hidden_states"])
            assert not torch.allclose(own[-1][0]["hidden_states"], dense_steps[-1][0]["hidden_states"])
        if step:
            fresh.transformer.load_state_dict(weights[step], strict=False)
        pick = int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(3 * 1_000_003 + step)))
        assert whole.losses[step] == pytest.approx(_guided_error(fresh, teacher, own[pick], 5.0), rel=1e-5), step
    handle.remove()

    killed = parse_finetune_config(dict(opts, output=str(tmp_path / "killed")))
    resumed = killed_then_resumed(killed, lambda: tiny_pipeline("wan21", seed=0))
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_weights_choose_which_sampler_steps_train():
    """step_weights draws the sampler step by weight: zero-weight steps are never drawn, and the draw follows the
    weights; a list that does not fit the sampler's step count is refused by name."""
    from attnproc.workflows.finetune import pick_step

    cfg = parse_finetune_config(dict(BASE, output="x", data="trajectory", step_weights=[3, 1, 0]))
    picks = [pick_step(torch.Generator().manual_seed(s), 3, cfg) for s in range(4000)]
    assert set(picks) == {0, 1} and abs(picks.count(0) / len(picks) - 0.75) < 0.03
    uniform = parse_finetune_config(dict(BASE, output="x", data="trajectory"))
    assert {pick_step(torch.Generator().manual_seed(s), 3, uniform) for s in range(200)} == {0, 1, 2}
    with pytest.raises(ValueError, match=r"step_weights: has 3 weights, but the sampler made 4 steps"):
        pick_step(torch.Generator(), 4, cfg)
