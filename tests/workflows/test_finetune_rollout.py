"""``rollout_steps``: the end-to-end loss after K sampler steps (workflows/rollout.py), checked by hand."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import attnproc
from attnproc.pipelines import tiny_pipeline
from attnproc.workflows.finetune import (FinetuneConfigError, finetune, parse_finetune_config, pick_step,
                                         record_calls, sampler_steps)
from attnproc.workflows.rollout import rollout_loss, sampler_sigmas
from test_finetune import killed_then_resumed

SCALE = 5.0
BASE = dict(pipeline="tiny:wan21", method="sla", options=dict(topk=0.5), train="method", lr=5e-2, steps=4,
            checkpoint_every=2, data_steps=3, seed=3, guidance_scale=SCALE)


def _guided(model, group, x):
    outs = [model(**dict(c, hidden_states=x), return_dict=False)[0] for c in group]
    return outs[1] + SCALE * (outs[0] - outs[1])


def _by_hand(student, teacher, steps, sigmas, start, k, detach=False):
    """The definition written out: both samplers take k Euler steps from the recorded state; squared distance
    of the ends over the window's sigma span squared. ``detach``: cut the student's graph between steps."""
    xs = xt = steps[start][0]["hidden_states"]
    for i in range(start, start + k):
        dt = sigmas[i + 1] - sigmas[i]
        with torch.no_grad():
            xt = xt + dt * _guided(teacher, steps[i], xt)
        xs = (xs.detach() if detach else xs) + dt * _guided(student, steps[i], xs.detach() if detach else xs)
    return ((xs - xt) ** 2).mean() / float(sigmas[start + k] - sigmas[start]) ** 2


@pytest.fixture(scope="module")
def tiny():
    """Tiny Wan 2.1 with 3 sampler steps: the dense trajectory, its sigmas, a dense teacher and an SLA student."""
    cfg = parse_finetune_config(dict(BASE, data="trajectory", output="unused"))
    pipe = tiny_pipeline("wan21", seed=0)
    steps = sampler_steps(record_calls(pipe, cfg), SCALE)
    sigmas = sampler_sigmas(pipe, len(steps))
    teacher = copy.deepcopy(pipe.transformer).eval()
    handle = attnproc.apply(pipe, "sla", topk=0.5)
    with torch.no_grad():  # non-zero projections, so the linear branch takes part in the gradient too
        for state in handle.states().values():
            for p in state.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    yield pipe, steps, sigmas, teacher, handle
    handle.remove()


def test_one_step_is_the_per_step_loss_and_the_dense_rollout_is_the_recorded_trajectory(tiny):
    pipe, steps, sigmas, teacher, _ = tiny
    assert sigmas[-1] == 0 and torch.allclose(sigmas[:-1] * 1000, torch.tensor([float(g[0]["timestep"][0])
                                                                                for g in steps]))
    x = steps[0][0]["hidden_states"]  # the dense teacher stepped by the definition lands on the recorded states
    with torch.no_grad():
        for i in range(2):
            x = x + (sigmas[i + 1] - sigmas[i]) * _guided(teacher, steps[i], x)
            assert torch.equal(x, steps[i + 1][0]["hidden_states"]), i
        assert float(rollout_loss(teacher, teacher, steps, sigmas, 0, 3, SCALE)) == 0.0
        for start in range(3):  # K = 1: the guided per-step loss, unscaled
            x = steps[start][0]["hidden_states"]
            per_step = ((_guided(pipe.transformer, steps[start], x) - _guided(teacher, steps[start], x)) ** 2).mean()
            one = rollout_loss(pipe.transformer, teacher, steps, sigmas, start, 1, SCALE)
            assert float(one) == pytest.approx(float(per_step), rel=1e-5) and float(one) > 0
            both = rollout_loss(pipe.transformer, teacher, steps, sigmas, start, 1, SCALE, step_loss_weight=0.5)
            assert float(both) == pytest.approx(1.5 * float(per_step), rel=1e-5)
        # a window past the end is cut there: from step 1, K = 5 is the 2-step window 1..2
        assert float(rollout_loss(pipe.transformer, teacher, steps, sigmas, 1, 5, SCALE)) == pytest.approx(
            float(_by_hand(pipe.transformer, teacher, steps, sigmas, 1, 2)), rel=1e-5)


def test_the_gradient_flows_through_every_step_of_the_window(tiny):
    """The gradient of the 3-step rollout loss equals the written-out definition's, with or without step
    checkpointing, and differs from a rollout whose steps are cut from each other's graph."""
    pipe, steps, sigmas, teacher, handle = tiny
    params = [p for s in handle.states().values() for p in s.parameters()]

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    got = grads(rollout_loss(pipe.transformer, teacher, steps, sigmas, 0, 3, SCALE))
    ref = grads(_by_hand(pipe.transformer, teacher, steps, sigmas, 0, 3))
    cut = grads(_by_hand(pipe.transformer, teacher, steps, sigmas, 0, 3, detach=True))
    ckpt = grads(rollout_loss(pipe.transformer, teacher, steps, sigmas, 0, 3, SCALE, checkpoint_steps=True))
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-9) and torch.allclose(ckpt, got, rtol=1e-5, atol=1e-10)
    assert (got - cut).norm() > 0.05 * got.norm()  # the earlier steps' effect on the end is in the gradient


def test_rollout_finetune_trains_on_policy_by_hand_and_resumes_exactly(tmp_path):
    """data: on_policy + rollout_steps 2: the first loss is the rollout loss from the drawn step of the student's
    own generation (zero projections at step 0: block-sparse), plus 0.5 x its per-step loss; a kill at step 3
    and a resume give the uninterrupted run's losses and projections; step checkpointing changes nothing."""
    opts = dict(BASE, data="on_policy", refresh_every=2, rollout_steps=2, step_loss_weight=0.5)
    whole = finetune(parse_finetune_config(dict(opts, output=str(tmp_path / "whole"))),
                     pipe=tiny_pipeline("wan21", seed=0), progress=False)
    fresh = tiny_pipeline("wan21", seed=0)
    teacher = copy.deepcopy(fresh.transformer).eval()
    cfg = parse_finetune_config(dict(opts, output="unused"))
    handle = attnproc.apply(fresh, "sla", topk=0.5)
    own = sampler_steps(record_calls(fresh, cfg, seed=3 * 1_000_003 + 500_000_000), SCALE)
    start = pick_step(torch.Generator().manual_seed(3 * 1_000_003), 3, cfg)
    with torch.no_grad():
        rolled = _by_hand(fresh.transformer, teacher, own, sampler_sigmas(fresh, 3), start, min(2, 3 - start))
        x = own[start][0]["hidden_states"]
        per_step = ((_guided(fresh.transformer, own[start], x) - _guided(teacher, own[start], x)) ** 2).mean()
    handle.remove()
    assert whole.losses[0] == pytest.approx(float(rolled + 0.5 * per_step), rel=1e-5)

    killed = parse_finetune_config(dict(opts, output=str(tmp_path / "killed")))
    resumed = killed_then_resumed(killed, lambda: tiny_pipeline("wan21", seed=0))
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gc = finetune(parse_finetune_config(dict(opts, steps=2, gradient_checkpointing=True, output=str(tmp_path / "gc"))),
                  pipe=tiny_pipeline("wan21", seed=0), progress=False)
    assert gc.losses == pytest.approx(whole.losses[:2], rel=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(rollout_steps=2, guidance_scale=None), r"rollout_steps: needs data: trajectory or on_policy"),
    (dict(data="trajectory", rollout_steps=0), r"rollout_steps: must be an integer >= 1"),
    (dict(data="trajectory", step_loss_weight=1.0), r"step_loss_weight: needs rollout_steps"),
    (dict(data="trajectory", rollout_steps=2, step_loss_weight=-1), r"step_loss_weight: must be >= 0, got -1.0"),
    (dict(data="trajectory", rollout_steps=2, context_parallel="ulysses=2"),
     r"context_parallel: not supported with rollout_steps"),
])
def test_rollout_config_errors_name_the_field(change, match):
    with pytest.raises(FinetuneConfigError, match=match):
        parse_finetune_config(dict(BASE, output="unused", **change))


def test_a_sampler_that_is_not_flow_matching_euler_is_refused_by_name():
    pipe = tiny_pipeline("sd15", seed=0)
    with pytest.raises(ValueError, match=r"rollout_steps: needs a deterministic flow-matching Euler sampler .*"
                                         r"DDIMScheduler"):
        sampler_sigmas(pipe, 3)
