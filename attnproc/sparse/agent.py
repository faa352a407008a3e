"""Agent Attention for Stable Diffusion UNets (AgentSD: ToMe token merging plus agent tokens), training-free.

AgentSD (LeapLabTHU/Agent-Attention ``agentsd/``, arXiv 2312.08874) changes the self-attention of the UNet's
full-resolution transformer blocks:

1. ToMe bipartite soft matching on the block input: one destination token per ``sx x sy`` window (random inside
   the window when the batch is even), every source joins its most similar destination, the ``r`` most similar
   sources are averaged into their destination, so attention sees ``N' = N - r`` tokens;
2. the same match with a larger merge count gives ``n`` agent tokens, projected with the layer's own ``to_q``;
3. ``O = softmax(Q A^T tau2) softmax(A K^T tau1) V + shortcut * V`` (``tau1 = d^-0.5``, ``tau2 = tau1^0.3``)
   when ``2 n < N'``, plain softmax attention over the merged tokens (plain ToMe) otherwise;
4. the output is copied back to every token of its group (unmerge).

The pieces are plain functions so an independent parity check can call them: :func:`tome_merge`,
:func:`agent_attention`, :func:`agent_self_attention` (the whole attn1 path on a diffusers ``Attention``),
:func:`merge_grid` (the ``max_downsample`` level rule) and :meth:`AgentConfig.at_step` (the step schedule).
:func:`pooled_agent_attention` is the generic DiT variant (agents pooled from the queries over the token grid).
See ``docs/agent.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from attnproc.errors import ContextParallelError, UnsupportedFamilyError
from attnproc.kernels import dense_attention
from attnproc.method import Method
from attnproc.options import option
from attnproc.registry import register

__all__ = ["agent_attention", "tome_merge", "agent_self_attention", "merge_grid", "pooled_agent_attention",
           "AgentConfig", "AgentStep", "UNET_FAMILIES", "check_family", "first_attention_level", "call_generator",
           "Agent"]

UNET_FAMILIES = ("unet",)
MAX_DOWNSAMPLE_CHOICES = (1, 2, 4, 8)


# ---- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgentStep:
    """The merge settings of one denoising step (what the reference passes to ``apply_patch``)."""

    sx: int
    sy: int
    ratio: float
    agent_ratio: float

    def __post_init__(self):
        _check_step(self.sx, self.sy, self.ratio, self.agent_ratio)


def _check_step(sx, sy, ratio, agent_ratio) -> None:
    for name, value in (("sx", sx), ("sy", sy)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (the destination window size), got {value!r}")
    for name, value in (("ratio", ratio), ("agent_ratio", agent_ratio)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise ValueError(f"{name} must be a number in [0, 1) (the fraction of tokens merged), got {value!r}")


@dataclass
class AgentConfig:
    """AgentSD options. Defaults are the reference README's recipe for SD 1.5 (50 PLMS steps: sx=sy=4,
    agent_ratio 0.95 for steps 0-19, then sx=sy=2, agent_ratio 0.5, ratio 0.4 throughout), scaled to any step
    count by ``early_steps``. ``shortcut`` applies to UNets only: the DiT variant uses none (it hurts there)."""

    ratio: float = option(0.4, low=0, high=0.999, help="fraction of tokens merged away before self-attention, [0, 1)")
    early_steps: float = option(0.4, low=0, high=10000,
                                help="steps using the early settings (a value < 1 is a fraction of all steps)")
    early_sx: int = option(4, low=1, high=64, help="destination window width in the early steps")
    early_sy: int = option(4, low=1, high=64, help="destination window height in the early steps")
    early_agent_ratio: float = option(0.95, low=0, high=0.999,
                                      help="fraction of tokens merged away to form the agents, early steps")
    late_sx: int = option(2, low=1, high=64, help="destination window width in the later steps")
    late_sy: int = option(2, low=1, high=64, help="destination window height in the later steps")
    late_agent_ratio: float = option(0.5, low=0, high=0.999,
                                     help="fraction merged away to form the agents, later steps (0.5: agents off)")
    max_downsample: int | None = option(None, choices=MAX_DOWNSAMPLE_CHOICES,
                                        help="patch blocks whose resolution is at most this many times below the "
                                             "latent's (automatic: the UNet's first attention level, 1 for SD "
                                             "1.x/2.x, 2 for SDXL)")
    agent_power: float = option(0.3, low=0, high=10, help="agent readout scale is (d^-0.5)^agent_power")
    shortcut: float = option(0.075, low=0, high=10, help="weight of the V shortcut added to the agent output")
    use_rand: bool = option(True, help="random destination inside each window (even batches only, as the reference)")
    agents: bool = option(True, help="False: plain ToMe (tomesd: merge, softmax over the merged tokens, unmerge; "
                                     "no agents at any step), the baseline agent attention is measured against")
    dit: bool = option(False, help="allow DiT families: agents pooled from the queries (lossy, see docs/agent.md)")
    dit_agent_grid: int = option(16, low=1, high=256,
                                 help="DiT variant: agents per side of each frame's token grid (16: 256 agents)")
    seed: int = option(0, low=0, high=2**31 - 1,
                       help="seed of the random destinations (one generator per step and module, see docs/agent.md)")

    def validate(self):
        for name in ("ratio", "early_agent_ratio", "late_agent_ratio"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.max_downsample is not None and self.max_downsample not in MAX_DOWNSAMPLE_CHOICES:
            # build_config checks ranges, not numeric choices
            raise ValueError(f"max_downsample must be one of {MAX_DOWNSAMPLE_CHOICES}, got {self.max_downsample!r}")

    def switch_step(self, num_steps: int) -> int:
        """The first step index that uses the late settings (20 of 50 with the defaults)."""
        v = self.early_steps
        return int(round(v * num_steps)) if v < 1 else int(v)

    def at_step(self, index: int | None, num_steps: int | None) -> AgentStep:
        """The merge settings of step ``index`` of ``num_steps``; the early settings when the step is unknown."""
        late = index is not None and bool(num_steps) and index >= self.switch_step(num_steps)
        if late:
            step = AgentStep(self.late_sx, self.late_sy, self.ratio, self.late_agent_ratio)
        else:
            step = AgentStep(self.early_sx, self.early_sy, self.ratio, self.early_agent_ratio)
        # agent_ratio 0 merges no agent tokens, so tome_merge's 2n < N' gate is off: plain ToMe
        return step if self.agents else replace(step, agent_ratio=0.0)

    def plan(self, latent_hw: tuple[int, int], num_tokens: int, index: int | None = None,
             num_steps: int | None = None, *, auto_downsample: int = 1) -> tuple[tuple[int, int], AgentStep] | None:
        """What one block's ``attn1`` does at this step: ``(grid, settings)``, or ``None`` when the level rule
        leaves the block alone. ``auto_downsample`` stands for ``max_downsample=None`` (see
        :func:`first_attention_level`)."""
        limit = self.max_downsample if self.max_downsample is not None else auto_downsample
        grid = merge_grid(latent_hw, num_tokens, limit)
        return None if grid is None else (grid, self.at_step(index, num_steps))


def check_family(family: str | None, *, dit: bool = False) -> None:
    """AgentSD serves UNets; a DiT family needs the generic variant to be asked for explicitly."""
    if family in UNET_FAMILIES or (dit and family is not None):
        return
    raise UnsupportedFamilyError(
        f"method 'agent' serves the UNet families {UNET_FAMILIES} (SD 1.x/2.x, SDXL); family {family!r} is a DiT: "
        "set dit=True for the generic pooled-agent variant (lossy, see docs/agent.md)")


def merge_grid(latent_hw: tuple[int, int], num_tokens: int, max_downsample: int = 1) -> tuple[int, int] | None:
    """The token grid of a transformer block with ``num_tokens`` tokens, or ``None`` if the reference leaves it
    alone: downsample = ceil(sqrt(latent tokens // num_tokens)), patched when <= ``max_downsample``, grid =
    ceil(latent / downsample) per side (so odd latent sizes follow the UNet's rounding up)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    down = int(math.ceil(math.sqrt((h * w) // num_tokens)))
    if down > max_downsample:
        return None
    return int(math.ceil(h / down)), int(math.ceil(w / down))


# ---- ToMe bipartite soft matching --------------------------------------------------------------------------
def _fork_default_generator(device: torch.device) -> torch.Generator:
    """A copy of torch's default generator for ``device`` (the reference forks it; the global state is untouched)."""
    if device.type == "cuda":
        return torch.Generator(device=device).set_state(torch.cuda.get_rng_state(device))
    return torch.Generator(device="cpu").set_state(torch.get_rng_state())


def _destinations(h: int, w: int, sx: int, sy: int, randomize: bool, generator, device) -> torch.Tensor:
    """Bool ``[h * w]``: the destination tokens, one per full ``sx x sy`` window (tokens of partial windows at the
    bottom/right edge are all sources). Draws ``(h // sy) * (w // sx)`` integers in ``[0, sx * sy)``."""
    hs, ws = h // sy, w // sx
    if randomize:
        if generator is None:
            generator = _fork_default_generator(device)
        offset = torch.randint(sx * sy, size=(hs, ws, 1), device=generator.device, generator=generator)
        offset = offset.to(device).view(hs, ws)
    else:
        offset = torch.zeros(hs, ws, dtype=torch.long, device=device)
    rows = torch.arange(hs, device=device)[:, None] * sy + offset // sx
    cols = torch.arange(ws, device=device)[None, :] * sx + offset % sx
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[rows, cols] = True
    return mask.view(-1)


def _segment_mean(x: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Mean of the tokens of ``x [B, N, C]`` sharing a ``slot [B, N]`` (every slot in ``[0, n_slots)`` is used).
    Every token has size 1 here, so this is ToMe's size-weighted mean."""
    B, _, C = x.shape
    total = x.new_zeros(B, n_slots, C).scatter_add_(1, slot[..., None].expand(-1, -1, C), x)
    count = x.new_zeros(B, n_slots).scatter_add_(1, slot, x.new_ones(slot.shape))
    return total / count[..., None]


def _slots(order: torch.Tensor, best_dst: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int,
           n: int) -> torch.Tensor:
    """Slot of every token when the first ``r`` sources of ``order`` merge into ``best_dst``: unmerged sources
    take slots ``0..S-r-1`` in ``order``, destination ``j`` takes slot ``S - r + j`` (the reference's order)."""
    B, S = order.shape
    keep = S - r
    slot_of_src = torch.empty_like(order)
    rank = torch.arange(S, device=order.device).expand(B, S)
    merged_into = keep + best_dst.gather(1, order)  # slot of the destination each ranked source would join
    slot_of_src.scatter_(1, order, torch.where(rank < r, merged_into, rank - r))
    slot = torch.empty(B, n, dtype=torch.long, device=order.device)
    slot[:, src] = slot_of_src
    slot[:, dst] = keep + torch.arange(dst.numel(), device=order.device)
    return slot


def tome_merge(metric: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], *, sx: int, sy: int, ratio: float,
               agent_ratio: float, generator: torch.Generator | None = None, use_rand: bool = True,
               ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """AgentSD's token merge: ``(merged [B, N', C], agents [B, n, C] or None, unmerge)``.

    ``metric`` ``[B, N, C]`` is the block input (cosine similarity), ``x`` ``[B, N, C']`` the tokens to merge
    (``norm1`` of it), ``grid = (h, w)`` with ``h * w == N`` in row-major order. ``r = floor(N * ratio)`` sources
    merge; agents merge ``floor(N * agent_ratio)`` (capped at the source count) and exist only when
    ``2 n < N'``. With an even batch and ``use_rand``, one ``torch.randint`` over the full windows is drawn from
    ``generator`` exactly as the reference does (``None``: a fork of torch's default generator, left untouched);
    an odd batch uses each window's top-left token and draws nothing. ``unmerge`` maps ``[B, N', D]`` back to
    ``[B, N, D]`` by copying each merged token's value to the tokens it stands for.
    """
    B, N, _ = metric.shape
    h, w = int(grid[0]), int(grid[1])
    _check_step(sx, sy, ratio, agent_ratio)
    if x.shape[:2] != metric.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and metric {tuple(metric.shape)} must share [B, N]")
    if h * w != N:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the input has {N}")
    if sx > w or sy > h:
        raise ValueError(f"the destination window sx={sx} x sy={sy} is larger than the {h}x{w} token grid "
                         f"(sx must be <= width {w}, sy <= height {h})")
    r = int(N * ratio)
    if r <= 0:
        return x, None, lambda y: y

    with torch.no_grad():
        randomize = use_rand and B % 2 == 0
        is_dst = _destinations(h, w, sx, sy, randomize, generator, metric.device)
        # The reference lists destinations then sources by an (unstable) argsort of this map; the same sort call
        # keeps ``merged`` and ``agents`` in its row order (attention and unmerge do not depend on it).
        token_order = (-is_dst.long()).view(1, -1, 1).argsort(dim=1).view(-1)
        n_dst = int(is_dst.sum())
        dst, src = token_order[:n_dst], token_order[n_dst:]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, src] @ unit[:, dst].transpose(1, 2)
        best, best_dst = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # ties: the reference's sort, unstable
        n_src = src.numel()
        r = min(r, n_src)
        agent_r = min(int(N * agent_ratio), n_src)
        slot = _slots(order, best_dst, src, dst, r, N)
        agent_slot = None
        if 2 * (N - agent_r) < N - r:
            agent_slot = _slots(order, best_dst, src, dst, agent_r, N)

    merged = _segment_mean(x, slot, N - r)
    agents = None if agent_slot is None else _segment_mean(x, agent_slot, N - agent_r)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        if y.shape[:2] != (B, N - r):
            raise ValueError(f"unmerge expects [B={B}, N'={N - r}, D], got {tuple(y.shape)}")
        return y.gather(1, slot[..., None].expand(-1, -1, y.shape[-1]))

    return merged, agents, unmerge


# ---- attention ---------------------------------------------------------------------------------------------
def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, *,
                    scale: float | None = None, agent_power: float = 0.3, shortcut: float = 0.075,
                    upcast: bool = False) -> torch.Tensor:
    """``softmax(Q A^T s^p) softmax(A K^T s) V + shortcut * V`` over ``[B, H, *, D]`` (``s`` = ``scale`` or
    ``D^-0.5``, ``p`` = ``agent_power``): the agents gather from every key, every query reads the agents.
    ``upcast`` computes the scores in float32 (the reference's ``attn_precision="fp32"`` for SD 2.1)."""
    if q.ndim != 4 or agents.ndim != 4 or k.shape != v.shape[:-1] + k.shape[-1:]:
        raise ValueError(f"expected q, k, v, agents as [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(agents.shape)}")
    if v.shape[2] != q.shape[2] and shortcut:
        raise ValueError("the V shortcut needs as many values as queries (self-attention)")
    s = q.shape[-1] ** -0.5 if scale is None else scale
    # both steps are ordinary softmax attentions: agents attend the keys, queries attend the agents
    if upcast:
        agent_v = dense_attention(agents.float(), k.float(), v.float(), scale=s)
        out = dense_attention(q.float(), agents.float(), agent_v, scale=s ** agent_power).to(v.dtype)
    else:
        agent_v = dense_attention(agents, k, v, scale=s)  # [B, H, n, Dv]
        out = dense_attention(q, agents, agent_v, scale=s ** agent_power)
    return out + shortcut * v if shortcut else out


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, S, C = t.shape
    return t.view(B, S, heads, C // heads).transpose(1, 2)


def agent_self_attention(attn: torch.nn.Module, hidden_states: torch.Tensor, block_input: torch.Tensor,
                         grid: tuple[int, int], step: AgentStep, *, agent_power: float = 0.3,
                         shortcut: float = 0.075, generator: torch.Generator | None = None,
                         use_rand: bool = True) -> torch.Tensor:
    """AgentSD's whole ``attn1`` on a diffusers ``Attention``: merge ``hidden_states`` (``norm1`` of
    ``block_input``) by the ``block_input`` metric, attend with agents (projected by ``attn.to_q``) or plain
    softmax over the merged tokens when the gate is off, ``to_out``, unmerge. Returns ``[B, N, C]``, what
    ``attn1`` returns (the block adds its residual)."""
    for name in ("group_norm", "spatial_norm"):
        if getattr(attn, name, None) is not None:
            raise ValueError(f"agent self-attention does not support an Attention with {name}")
    if getattr(attn, "is_cross_attention", False):
        raise ValueError("agent self-attention applies to self-attention (attn1) only")
    merged, agents, unmerge = tome_merge(block_input, hidden_states, grid, sx=step.sx, sy=step.sy,
                                         ratio=step.ratio, agent_ratio=step.agent_ratio, generator=generator,
                                         use_rand=use_rand)
    heads = attn.heads
    q, k, v = (_heads(p(merged), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if agents is not None:
        a = _heads(attn.to_q(agents), heads)
        if getattr(attn, "norm_q", None) is not None:
            a = attn.norm_q(a)
        out = agent_attention(q, k, v, a, scale=attn.scale, agent_power=agent_power, shortcut=shortcut,
                              upcast=bool(getattr(attn, "upcast_attention", False)))
    else:
        out = dense_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(merged.shape[0], merged.shape[1], -1).to(q.dtype)
    out = unmerge(attn.to_out[1](attn.to_out[0](out)))
    if getattr(attn, "residual_connection", False):
        out = out + hidden_states
    return out / getattr(attn, "rescale_output_factor", 1.0)


# ---- generic DiT variant -----------------------------------------------------------------------------------
def pooled_agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], *,
                           agent_grid: tuple[int, int, int] = (1, 8, 8), text_len: int = 0,
                           text_position: str = "before", scale: float | None = None, agent_power: float = 0.3,
                           shortcut: float = 0.0) -> torch.Tensor:
    """Agent attention as a linear-cost approximation of DiT self/joint attention, ``[B, H, S, D]``.

    Agents are the visual queries average-pooled over the ``(frames, height, width)`` token ``grid`` down to
    ``agent_grid``; they gather from the visual keys (``softmax(A K^T s) V``). A visual query reads the agents
    and the text keys in one softmax, each agent's logit ``q.a s^p`` raised by ``log(tokens it pools)`` so a
    region of identical keys keeps its mass. Text queries attend densely to every key. Costs
    ``O(N_vis * (n + text))`` instead of ``O(S^2)``.
    """
    B, H, S, D = q.shape
    f, h, w = (int(g) for g in grid)
    n_vis = f * h * w
    if S != n_vis + text_len:
        raise ValueError(f"sequence length {S} != visual {f}x{h}x{w} + text {text_len}")
    if text_position not in ("before", "after"):
        raise ValueError(f"text_position must be 'before' or 'after', got {text_position!r}")
    if any(a < 1 or a > g for a, g in zip(agent_grid, (f, h, w))):
        raise ValueError(f"agent_grid {tuple(agent_grid)} must be within [1, grid {f, h, w}] per axis")
    s = D ** -0.5 if scale is None else scale
    vis = slice(text_len, S) if text_position == "before" else slice(0, n_vis)
    txt = slice(0, text_len) if text_position == "before" else slice(n_vis, S)
    qv, kv, vv = q[:, :, vis], k[:, :, vis], v[:, :, vis]

    cells = qv.reshape(B * H, f, h, w, D).permute(0, 4, 1, 2, 3)
    agents = F.adaptive_avg_pool3d(cells, agent_grid).flatten(2).transpose(1, 2).view(B, H, -1, D)
    log_count = _pool_counts((f, h, w), agent_grid, q.device).flatten().log().to(q.dtype)

    agent_v = torch.softmax(agents @ kv.transpose(-1, -2) * s, dim=-1) @ vv
    logits = qv @ agents.transpose(-1, -2) * s ** agent_power + log_count
    values = agent_v
    if text_len:
        logits = torch.cat([logits, qv @ k[:, :, txt].transpose(-1, -2) * s], dim=-1)
        values = torch.cat([agent_v, v[:, :, txt]], dim=2)
    out_vis = torch.softmax(logits, dim=-1) @ values
    if shortcut:
        out_vis = out_vis + shortcut * vv
    if not text_len:
        return out_vis
    out_txt = dense_attention(q[:, :, txt], k, v, scale=s)
    parts = (out_txt, out_vis) if text_position == "before" else (out_vis, out_txt)
    return torch.cat(parts, dim=2)


def _pool_counts(grid, agent_grid, device) -> torch.Tensor:
    """How many grid cells each adaptive-pooling window covers (windows may overlap when sizes do not divide)."""
    sizes = []
    for g, a in zip(grid, agent_grid):
        i = torch.arange(a)
        start = (i * g) // a
        end = ((i + 1) * g + a - 1) // a
        sizes.append((end - start).to(torch.float32))
    counts = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    return counts.to(device)


# ---- the registered method ---------------------------------------------------------------------------------
def first_attention_level(unet: torch.nn.Module) -> int:
    """The downsampling factor of a UNet's first level with attention (``2 ** index`` of its first down block
    with attentions): 1 for SD 1.x/2.x, 2 for SDXL, whose full-resolution level has no attention. It is what
    ``max_downsample=None`` patches, so the reference's default level rule does not leave SDXL unpatched."""
    types_ = list(getattr(getattr(unet, "config", None), "down_block_types", None) or ())
    level = next((i for i, t in enumerate(types_) if "Attn" in t), 0)
    return min(2 ** level, MAX_DOWNSAMPLE_CHOICES[-1])


def call_generator(seed: int, step_index: int | None, module_index: int | None) -> torch.Generator:
    """The generator for the random destinations of one ``attn1`` call: a fresh CPU generator seeded from the
    method's ``seed``, the step and the module, so every block and step draws its own windows, runs repeat
    exactly, and no state is carried between calls (the reference consumes one forked generator in call order)."""
    return torch.Generator().manual_seed((int(seed) * 100_003 + (step_index or 0)) * 10_007 + (module_index or 0))


@register
class Agent(Method):
    """AgentSD on SD 1.x/2.x and SDXL UNets: the whole ``attn1`` of each patched level is replaced by
    :func:`agent_self_attention` (tokens are merged before the projections, so the method computes the module's
    output: ``computes_output``); cross-attention and other levels run stock. ``dit=True`` opens DiT families to
    :func:`pooled_agent_attention` on their self/joint SDPA call (lossy, docs/agent.md)."""

    name = "agent"
    summary = ("AgentSD: ToMe token merging plus agent tokens in the UNet self-attention (training-free; SD 1.x/2.x, "
               "SDXL)")
    Config = AgentConfig
    needs_block_input = True
    computes_output = True

    def __init__(self, config=None):
        super().__init__(config)
        self._auto_downsample: dict[str | None, int] = {}  # per denoiser, found by bind

    def check_family(self, family: str | None) -> None:
        check_family(family, dit=self.config.dit)

    def check_parallel(self, mode: str) -> None:
        """Refused under context parallelism: it serves UNets, which diffusers' CP does not shard (no CP plan),
        and it merges tokens before the projections, which needs every token of the module's input."""
        raise ContextParallelError(
            f"method 'agent' does not support diffusers context parallelism ({mode} mode): it serves UNets, which "
            "diffusers' context parallelism does not shard, and merges tokens before the projections, which needs "
            "every token of the module's input on one rank; run it without enable_parallelism. See "
            "docs/context_parallel.md")

    def bind(self, target) -> None:
        super().bind(target)
        models = ([(type(target).__name__, target)] if isinstance(target, torch.nn.Module)
                  else [(n, getattr(target, n, None)) for n in ("unet",)])
        self._auto_downsample = {n: first_attention_level(m) for n, m in models if isinstance(m, torch.nn.Module)}

    def module_output(self, site):
        if site.kind != "self" or site.family not in UNET_FAMILIES:
            return None  # cross-attention stays stock; DiT calls go through attention()
        x = site.inputs.hidden_states
        base = site.base_layout
        if base is None:
            site.require_layout(self.name)  # raises with what to do
        step = site.step
        index, num_steps = (step.index, step.num_steps) if step is not None else (None, None)
        plan = self.config.plan((base.height, base.width), x.shape[1], index, num_steps,
                                auto_downsample=self._auto_downsample.get(site.denoiser, 1))
        if plan is None:
            return None
        grid, settings = plan
        cfg = self.config
        return agent_self_attention(site.module, x, self.block_input(site), grid, settings,
                                    agent_power=cfg.agent_power, shortcut=cfg.shortcut, use_rand=cfg.use_rand,
                                    generator=call_generator(cfg.seed, index, site.index))

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        cfg = self.config
        if not (cfg.dit and site.family not in UNET_FAMILIES and site.kind in ("self", "joint") and attn_mask is None):
            return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        layout = site.require_layout(self.name)
        f, h, w = layout.grid
        text = layout.text_len if site.kind == "joint" else 0
        return pooled_agent_attention(q, k, v, (f, h, w), agent_grid=(f, min(cfg.dit_agent_grid, h),
                                                                      min(cfg.dit_agent_grid, w)),
                                      text_len=text, text_position=layout.text_position if text else "before",
                                      scale=scale, agent_power=cfg.agent_power, shortcut=0.0)
