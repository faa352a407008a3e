"""Named attention problem shapes of real models, for ``attnproc bench``.

Each :class:`ProblemShape` is one self/joint attention layer of a real model at its usual resolution: heads, head
dim, latent token grid after patchify, text tokens and where they sit, the number of such layers and denoising
steps, and the block widths (model dim, MLP) used to build a one-block random-weight model of the architecture
for the end-to-end estimate. Grids follow diffusers' pipeline defaults (VAE /8 in space, /4 in time, patch 2);
model sizes are the published configs (see ``shared/methods/performance-anchors.md`` section 0).

:meth:`ProblemShape.scaled` shrinks frames, height, width or heads to what fits the machine; a scaled shape keeps
its name with the changes listed, so a table never passes a smaller problem off as the real one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["ProblemShape", "SHAPES", "shape_named", "layer_model"]


@dataclass(frozen=True)
class ProblemShape:
    """One attention layer of a model: ``heads`` x ``head_dim`` over a ``frames x height x width`` token grid plus
    ``text_len`` text tokens (``text_position``: "before"/"after" = joint, "separate" = cross-attention, "none").
    ``dim``/``mlp_dim`` are the model's block widths; ``full`` is the unscaled shape of a scaled one."""

    name: str
    family: str
    title: str
    heads: int
    head_dim: int
    frames: int
    height: int
    width: int
    text_len: int
    text_position: str
    layers: int
    steps: int
    dim: int
    mlp_dim: int
    full: "ProblemShape | None" = None  # the unscaled shape, when this one is scaled

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def visual_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Tokens of the layer's self/joint attention call (the text joins it only in joint attention)."""
        return self.visual_len + (self.text_len if self.text_position in ("before", "after") else 0)

    @property
    def kind(self) -> str:
        return "joint" if self.text_position in ("before", "after") and self.text_len else "self"

    def label(self) -> str:
        """The name, and what was scaled (``wan2.1-1.3b-480p (frames 21->4, heads 12->2)``)."""
        if self.full is None:
            return self.name
        changes = [f"{f} {getattr(self.full, f)}->{getattr(self, f)}" for f in ("frames", "height", "width", "heads")
                   if getattr(self, f) != getattr(self.full, f)]
        return f"{self.name} ({', '.join(changes)})"

    def scaled(self, *, frames: int | None = None, height: int | None = None, width: int | None = None,
               heads: int | None = None) -> "ProblemShape":
        """The same layer with fewer frames, rows, columns or heads (for the per-layer timing; the one-block model
        of the estimate keeps the model's heads and width)."""
        full = self.full or self
        changes = {}
        for field, value in (("frames", frames), ("height", height), ("width", width), ("heads", heads)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= getattr(full, field):
                raise ValueError(f"{field}: must be an integer in [1, {getattr(full, field)}] for {full.name}; "
                                 f"got {value!r}")
            changes[field] = value
        if not changes:
            return self
        return dataclasses.replace(self, full=full, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "full"}
        out.update(label=self.label(), visual_len=self.visual_len, seq_len=self.seq_len, kind=self.kind)
        if self.full is not None:
            out["full"] = self.full.to_dict()
        return out


SHAPES: dict[str, ProblemShape] = {s.name: s for s in [
    # Wan 2.1: 81 frames -> 21 latent frames; 480x832 -> 60x104 latent -> 30x52 tokens; umT5 512 tokens (cross)
    ProblemShape("wan2.1-1.3b-480p", "wan", "Wan2.1-T2V-1.3B, 832x480, 81 frames", heads=12, head_dim=128,
                 frames=21, height=30, width=52, text_len=512, text_position="separate", layers=30, steps=50,
                 dim=1536, mlp_dim=8960),
    ProblemShape("wan2.1-14b-720p", "wan", "Wan2.1-T2V-14B, 1280x720, 81 frames", heads=40, head_dim=128,
                 frames=21, height=45, width=80, text_len=512, text_position="separate", layers=40, steps=50,
                 dim=5120, mlp_dim=13824),
    # HunyuanVideo: 129 frames -> 33; 720x1280 -> 45x80 tokens; joint [video, text], up to 256 text tokens;
    # 20 dual-stream + 40 single-stream blocks
    ProblemShape("hunyuanvideo-720p", "hunyuanvideo", "HunyuanVideo, 1280x720, 129 frames", heads=24, head_dim=128,
                 frames=33, height=45, width=80, text_len=256, text_position="after", layers=60, steps=50,
                 dim=3072, mlp_dim=12288),
    # CogVideoX-5B: 49 frames -> 13; 720x480 -> 30x45 tokens; joint [text, video] with 226 T5 tokens
    ProblemShape("cogvideox-5b-720x480", "cogvideox", "CogVideoX-5B, 720x480, 49 frames", heads=48, head_dim=64,
                 frames=13, height=30, width=45, text_len=226, text_position="before", layers=42, steps=50,
                 dim=3072, mlp_dim=12288),
    # Flux.1-dev: 1024x1024 -> 128x128 latent -> 64x64 packed tokens; joint [text, image], 512 T5 tokens;
    # 19 double + 38 single blocks, 28 steps
    ProblemShape("flux-1024", "flux", "FLUX.1-dev, 1024x1024", heads=24, head_dim=128, frames=1, height=64, width=64,
                 text_len=512, text_position="before", layers=57, steps=28, dim=3072, mlp_dim=12288),
    # SDXL: 1024x1024 -> 128x128 latent; the largest attention level is 64x64 tokens, 10 heads x 64 (640 ch.),
    # 10 transformer blocks there (2x2 down + 3x2 up), CLIP 77 tokens as cross-attention
    ProblemShape("sdxl-1024", "unet", "SDXL, 1024x1024 (the 64x64 attention level)", heads=10, head_dim=64,
                 frames=1, height=64, width=64, text_len=77, text_position="separate", layers=10, steps=50,
                 dim=640, mlp_dim=5120),
]}


def shape_named(name: str) -> ProblemShape:
    """The named shape (case-insensitive)."""
    shape = SHAPES.get(name.lower())
    if shape is None:
        raise ValueError(f"shape: unknown name {name!r}; named shapes are {sorted(SHAPES)} (or give the family, "
                         "grid, heads, head dim and text length explicitly)")
    return shape


def layer_model(shape: ProblemShape, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A random-weight denoiser of ``shape``'s architecture with one transformer block (dual-stream for
    HunyuanVideo/Flux) at the model's real width and head count (a scaled shape scales the grid, not the block),
    and the keyword arguments of one forward at ``shape``'s grid; or ``None`` for families without a one-block
    builder here (UNets, whose levels differ)."""
    import diffusers

    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    H, D, (F, h, w), T = (shape.full or shape).heads, shape.head_dim, shape.grid, shape.text_len
    step = torch.tensor([500.0], device=device)
    torch.manual_seed(seed)
    if shape.family == "wan":
        model = diffusers.WanTransformer3DModel(num_attention_heads=H, attention_head_dim=D, ffn_dim=shape.mlp_dim,
                                                num_layers=1)
        kwargs = dict(hidden_states=rand(1, 16, F, 2 * h, 2 * w), timestep=step,
                      encoder_hidden_states=rand(1, T, 4096))
    elif shape.family == "hunyuanvideo":
        model = diffusers.HunyuanVideoTransformer3DModel(num_attention_heads=H, attention_head_dim=D, num_layers=1,
                                                         num_single_layers=0, num_refiner_layers=1,
                                                         mlp_ratio=shape.mlp_dim / shape.dim)
        kwargs = dict(hidden_states=rand(1, 16, F, 2 * h, 2 * w), timestep=step,
                      encoder_hidden_states=rand(1, T, 4096),
                      encoder_attention_mask=torch.ones(1, T, dtype=torch.bool, device=device),
                      pooled_projections=rand(1, 768), guidance=torch.tensor([6000.0], device=device))
    elif shape.family == "flux":
        model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=0, attention_head_dim=D,
                                                 num_attention_heads=H, guidance_embeds=True)
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        kwargs = dict(hidden_states=rand(1, h * w, 64), encoder_hidden_states=rand(1, T, 4096),
                      pooled_projections=rand(1, 768), timestep=step / 1000,
                      img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).float(),
                      txt_ids=torch.zeros(T, 3, device=device), guidance=torch.tensor([3.5], device=device))
    elif shape.family == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(num_attention_heads=H, attention_head_dim=D, num_layers=1,
                                                      in_channels=16, out_channels=16, text_embed_dim=4096,
                                                      sample_frames=4 * F - 3, sample_height=2 * h,
                                                      sample_width=2 * w, use_rotary_positional_embeddings=True)
        kwargs = dict(hidden_states=rand(1, F, 16, 2 * h, 2 * w), encoder_hidden_states=rand(1, T, 4096),
                      timestep=step.long())
    else:
        return None
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.eval(), kwargs
