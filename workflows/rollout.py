"""End-to-end loss over a window of sampler steps (``attnproc finetune`` with ``rollout_steps``).

A per-step loss trains each velocity on its own, but the sampler carries an early step's error to the end of the
trajectory (docs/sla.md, "Why a lower per-step error did not give closer videos"). Here the student's *sampler*
runs ``K`` consecutive Euler steps from a recorded state, with gradients through every step, and the loss is the
distance of where it lands to where the dense teacher lands from the same state, same conditioning and same
timesteps:

    loss = mean ((x_student_K - x_teacher_K) / (sigma_{s+K} - sigma_s))^2  [+ step_loss_weight * per-step loss]

Dividing by the window's sigma span makes the loss the error of the window's mean velocity, so ``K = 1`` is
exactly the per-step (guided) loss and losses for different ``K`` are on one scale. Only deterministic
flow-matching Euler samplers are rolled out (``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v``, what diffusers'
``FlowMatchEulerDiscreteScheduler`` does without stochastic sampling): any other scheduler is refused by name.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def sampler_sigmas(pipe, n_steps: int) -> torch.Tensor:
    """The sigmas (``n_steps + 1``, ending at 0) of the generation ``pipe`` just ran, for rolling out its steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = pipe.scheduler
    if not isinstance(sched, FlowMatchEulerDiscreteScheduler) or sched.config.get("stochastic_sampling", False):
        raise ValueError(f"rollout_steps: needs a deterministic flow-matching Euler sampler "
                         f"(FlowMatchEulerDiscreteScheduler without stochastic_sampling), but the pipeline samples "
                         f"with {type(sched).__name__}; leave rollout_steps null")
    sigmas = sched.sigmas.detach().to("cpu", torch.float32).clone()
    if len(sigmas) != n_steps + 1:
        raise ValueError(f"rollout_steps: the scheduler has {len(sigmas)} sigmas for {n_steps} recorded sampler "
                         f"steps (expected one more than the steps)")
    return sigmas


def guided(outs: list[torch.Tensor], scale: float | None) -> list[torch.Tensor]:
    """What the sampler steps with: ``u + scale (c - u)`` for a (cond, uncond) pair, else the outputs as they are."""
    if scale is None:
        return outs
    cond, uncond = outs
    return [uncond + scale * (cond - uncond)]


def _velocity(model, group: list[dict], x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The prediction the sampler steps with at state ``x`` (:func:`guided` over the step's calls)."""
    outs = guided([model(**dict(c, hidden_states=x.to(c["hidden_states"].dtype)), return_dict=False)[0]
                   for c in group], scale)
    if len(outs) != 1:
        raise ValueError(f"rollout_steps: the sampler made {len(outs)} denoiser calls per step (classifier-free "
                         f"guidance); set guidance_scale to the sampling scale so the rollout steps as it does")
    return outs[0]


def rollout_loss(student, teacher, steps: list[list[dict]], sigmas: torch.Tensor, start: int, k: int,
                 scale: float | None, step_loss_weight: float = 0.0, checkpoint_steps: bool = False
                 ) -> torch.Tensor:
    """The end-to-end loss of the window ``start .. start + k - 1`` (shortened at the trajectory's end), both
    samplers starting at the recorded state of step ``start``. ``checkpoint_steps``: keep only each step's input
    latent and recompute the step's denoiser calls in backward (memory of one step instead of ``k``)."""
    end = min(start + k, len(steps))
    x0 = steps[start][0]["hidden_states"].to(torch.float32)
    xs, xt, first = x0, x0, None
    for i in range(start, end):
        dt = sigmas[i + 1] - sigmas[i]
        with torch.no_grad():
            vt = _velocity(teacher, steps[i], xt, scale)
        if checkpoint_steps and torch.is_grad_enabled():
            vs = checkpoint(_velocity, student, steps[i], xs, scale, use_reentrant=False)
        else:
            vs = _velocity(student, steps[i], xs, scale)
        if first is None:
            first = torch.mean((vs.float() - vt.float()) ** 2)
        xs = (xs + dt * vs).to(torch.float32)  # the scheduler's update, in fp32 as it upcasts
        xt = (xt + dt * vt).to(torch.float32)
    span = sigmas[end] - sigmas[start]
    loss = torch.mean(((xs - xt) / span) ** 2)
    return loss + step_loss_weight * first if step_loss_weight else loss
