"""Run under torchrun (2 CPU processes, gloo): attnproc methods under diffusers context parallelism give the
one-process output. Prints ``RESULT {json}`` on rank 0: per case the max abs difference to one process and to
dense, or the refusal message.

diffusers' ``enable_parallelism`` assumes an accelerator (``_resolve_parallel_config`` computes
``rank % torch.accelerator.device_count()``, a ZeroDivisionError on a CPU-only machine), so :func:`enable_cp`
does here, in test code only, what ``enable_parallelism`` does without that line: a CPU device mesh, the config's
``setup``, ``_parallel_config`` on the model and its processors, and ``apply_context_parallel`` with the plan.
"""
import json
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput, ParallelConfig
from torch.distributed.device_mesh import init_device_mesh

import attnproc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline

# HunyuanVideo has no _cp_plan in diffusers 0.42: split the first block's sequences and the RoPE tables (the
# attention mask stays whole: attnproc reads it in the unsharded order), gather proj_out
HUNYUAN_PLAN = {
    "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
             1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
PROMPT = "a red fox in the snow"
WORKDIR = tempfile.mkdtemp(prefix="attnproc-cp-")
SPARSE = dict(dense_first_steps=0, dense_first_layers=0)
METHODS = {
    "dense": {},
    "radial": dict(SPARSE, block_size=16),
    "gna": dict(dense_first_steps=0, block_target=32),
    "vmoba": dict(SPARSE, chunk_1d=1, chunk_2d=(3, 5), chunk_3d=(2, 3, 5), topk=2),  # several chunks on tiny grids
    "rectified": dict(SPARSE, block_size=16),
    "maskmod": "regions",
    "sla": "sla",  # with random projections (a weights file), so the linear branch counts
    "gna_5x5": dict(dense_first_steps=0, kernel_size=(3, 5, 5), stride=1, block_target=32),
}
SLA = dict(SPARSE, topk=0.25, block_q=16, block_k=16)


def sla_weights(pipe, path):
    """A projection file with seeded random proj_l per module (the same on every rank and every run)."""
    from attnproc.sparse.sla import SLA as SLAMethod, save_sla_weights

    g = torch.Generator().manual_seed(1)
    projections = {name: (0.5 * torch.randn(d, d, generator=g), 0.1 * torch.randn(d, generator=g))
                   for name, d in sorted(SLAMethod.weight_dims(pipe).items())}
    return save_sla_weights(path, projections, variant="main", model=SLAMethod.model_id(pipe))


def gather_ragged(module, args, output):
    """proj_out's gather for ulysses_anything, as a forward hook: gloo's all_gather needs equal sizes, so the
    shards are padded to the longest and trimmed after (diffusers' own gather of ragged shards is an uneven
    all_gather, which gloo refuses)."""
    mine = torch.tensor([output.shape[1]])
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    longest = int(max(sizes))
    padded = torch.nn.functional.pad(output, (0, 0, 0, longest - output.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :int(n)] for p, n in zip(parts, sizes)], dim=1)


def enable_cp(model, cp: ContextParallelConfig, plan=None):
    plan = dict(plan or model._cp_plan)
    if cp.ulysses_anything or cp.ring_anything:  # gather the output with gather_ragged (not an uneven all_gather)
        assert plan.pop("proj_out").gather_dim == 1
        model.proj_out.register_forward_hook(gather_ragged)
    config = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    apply_context_parallel(model, cp, plan)


def regions(family, size):
    f, h, w = size
    fox = np.zeros((h, w), bool)
    fox[:, : w // 2] = True
    if family != "flux":
        fox = np.repeat(fox[None], f, axis=0)
    if family == "hunyuanvideo":  # its prompt template hides the phrase tokens: give their positions
        return [{"phrase": "red fox", "mask": fox, "tokens": [2, 3]}, {"phrase": "snow", "mask": ~fox, "tokens": [6]}]
    return [{"phrase": "red fox", "mask": fox}, {"phrase": "snow", "mask": ~fox}]


def run(family, method, size, cp=None):
    pipe = tiny_pipeline(family, seed=0)
    if cp is not None:
        enable_cp(pipe.transformer, cp, HUNYUAN_PLAN if family == "hunyuanvideo" else None)
    options, method = METHODS[method], method.split("_")[0]
    if options == "regions":
        options = dict(prompt=PROMPT, regions=regions(family, size), active_steps=1.0)
    elif options == "sla":
        options = dict(SLA, weights=str(sla_weights(pipe, f"{WORKDIR}/sla_{family}_{dist.get_rank()}.safetensors")))
    attnproc.apply(pipe, method, **options)
    f, h, w = size
    kw = dict(height=h, width=w, num_inference_steps=2, output_type="latent", prompt=PROMPT)
    if family != "flux":
        kw["num_frames"] = f
    kw = tiny_call_kwargs(family, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pipe(**kw)
    x = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def case(results, name, family, method, size, cp, dense_ref=None):
    try:
        got = run(family, method, size, cp)
    except Exception as e:  # noqa: BLE001 - refusals are results
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        return
    ref = run(family, method, size)
    entry = {"max_diff": float((got - ref).abs().max()), "scale": float(ref.abs().max())}
    if dense_ref is not None:
        entry["vs_dense"] = float((ref - dense_ref).abs().max())
    results[name] = entry


def exchange(results):
    """The Ulysses exchange itself on ragged splits (what ulysses_anything gives: 243 visual tokens as 122 / 121,
    3 heads as 2 / 1, 7 text tokens as 4 / 3), in every kind of call, against the unsharded computation. The
    attention run on each rank scales each head's queries by its *global* index + 1, so a wrong head index shows.
    (diffusers' own ulysses_anything gathers the model output with an uneven all_gather, which gloo refuses.)"""
    from attnproc.families import FAMILIES
    from attnproc.layout import TokenLayout
    from attnproc.parallel import ParallelPlan, ulysses

    rank = dist.get_rank()
    plan = ParallelPlan("ulysses", dist.group.WORLD, rank, 2, ragged=True)
    layout = TokenLayout(3, 9, 9)
    g = torch.Generator().manual_seed(0)

    def attend(q, k, v, mask, heads):
        w = torch.tensor([h + 1.0 for h in heads])[None, :, None, None]
        return torch.nn.functional.scaled_dot_product_attention(q * w, k, v, attn_mask=mask)

    for kind, family in (("self", "wan"), ("cross", "wan"), ("cross", "ltx"), ("joint", "flux"),
                         ("joint", "hunyuanvideo")):
        fam = FAMILIES[family]
        N, T = layout.visual_len, 7
        q_len = N + T if kind == "joint" else N
        k_len = T if kind == "cross" else q_len
        q, k, v = (torch.randn(1, 3, n, 8, generator=g).requires_grad_() for n in (q_len, k_len, k_len))
        weight = torch.randn(1, 3, q_len, 8, generator=g)  # a loss that weighs every output element differently
        mask = torch.ones(1, 1, 1, k_len, dtype=torch.bool)
        mask[..., -2 if fam.joint_text != "before" or kind == "cross" else T - 2] = False  # one masked key
        full = attend(q, k, v, mask, range(3))
        (full * weight).sum().backward()

        def shard(x, parts, dim=2):  # rank's share of each part, concatenated in order
            return torch.cat([p.tensor_split(2, dim=dim)[rank] for p in x.split(parts, dim=dim)], dim=dim)

        q_parts = ([T, N] if fam.joint_text == "before" else [N, T]) if kind == "joint" else [N]
        k_parts = [T] if kind == "cross" else q_parts
        k_sharded = kind != "cross" or fam.cp_text_sharded
        qs = shard(q.detach(), q_parts).requires_grad_()
        ks, vs = (shard(x.detach(), k_parts) if k_sharded else x.detach() for x in (k, v))
        ks.requires_grad_(), vs.requires_grad_()
        local_mask = shard(mask, k_parts, dim=3) if k_sharded else mask
        got = ulysses(qs, ks, vs, local_mask, plan=plan, layout=layout, kind=kind, family=fam,
                      site_name=kind, run=attend)
        (got * shard(weight, q_parts)).sum().backward()  # each rank's share of the loss; backward exchanges too
        want = shard(full.detach(), q_parts)
        grad_diff = float((qs.grad - shard(q.grad, q_parts)).abs().max())
        if k_sharded:  # (whole text: each rank holds a partial gradient of k, v; their sum is the full one)
            grad_diff = max(grad_diff, float((ks.grad - shard(k.grad, k_parts)).abs().max()),
                            float((vs.grad - shard(v.grad, k_parts)).abs().max()))
        results[f"exchange/{kind}/{family}"] = {"max_diff": max(float((got - want).abs().max()), grad_diff),
                                                "scale": float(want.abs().max())}


def render_cp(workdir):
    """``attnproc render --cp`` (workflows.render with ``cp=``) of ``workdir/jobs.yaml`` under Ulysses and Ring
    degree 2; the pytest side renders it in one process and compares the files. The launch's state is
    accelerate's (it starts the gloo group); ``cp_setup`` is this script's :func:`enable_cp`."""
    from accelerate import PartialState

    from attnproc.workflows.render import render

    state = PartialState(cpu=True)
    for mode in ("ulysses", "ring"):
        summary = render(f"{workdir}/jobs.yaml", f"{workdir}/{mode}", cp=f"{mode}=2", state=state,
                         cp_setup=lambda model, config: enable_cp(model, config), progress=False)
        if state.is_main_process:
            print("RESULT " + json.dumps({mode: summary}))


def finetune_cp(workdir):
    """``attnproc finetune`` with ``context_parallel: ulysses=2`` (workflows.finetune with ``cp_setup`` =
    :func:`enable_cp`) of ``workdir/train.json``; the pytest side trains it in one process and compares."""
    from attnproc.workflows.finetune import finetune, parse_finetune_config

    cfg = parse_finetune_config(dict(json.loads(open(f"{workdir}/train.json").read()),
                                     output=f"{workdir}/cp", context_parallel="ulysses=2"))
    result = finetune(cfg, cp_setup=lambda model, config: enable_cp(model, config), progress=False)
    grads = gradient_sum()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"losses": result.losses, "weights": str(result.weights), "grads": grads}))


def gradient_sum():
    """What the trainer's loss scaling rests on: under Ulysses degree 2 each rank's gradient of the (same) loss
    covers its shard, so their sum is the one-process gradient (and DDP's mean is half of it). Tiny Wan 2.1's
    transformer with sla (random projections), one weighted loss over the whole output."""
    def model(cp):
        pipe = tiny_pipeline("wan21", seed=0)
        if cp:
            enable_cp(pipe.transformer, ContextParallelConfig(ulysses_degree=2))
        attnproc.apply(pipe, "sla", **dict(SLA, weights=str(sla_weights(pipe, f"{WORKDIR}/g{int(cp)}.safetensors"))))
        return pipe.transformer

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    w = torch.randn(1, 16, 3, 16, 16, generator=g)
    grads = []
    for cp in (False, True):
        m = model(cp)
        out = m(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
        (out * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for t in grads[1].values():
        dist.all_reduce(t)  # sum over the ranks
    diff = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    scale = max(float(t.abs().max()) for t in grads[0].values())
    return {"max_diff": diff, "scale": scale, "params": len(grads[0]), "params_cp": len(grads[1])}


def main(which):
    torch.set_num_threads(1)
    if which == "workflows":
        render_cp(sys.argv[2])
        finetune_cp(sys.argv[2])
        return
    dist.init_process_group("gloo")
    results = {}
    sizes = {"wan21": (9, 128, 128), "hunyuanvideo": (9, 128, 128), "flux": (1, 128, 128)}
    if which == "ulysses":
        for family, size in sizes.items():
            dense = run(family, "dense", size)
            for method in (m for m in METHODS if m != "gna_5x5"):
                case(results, f"{family}/{method}", family, method, size, ContextParallelConfig(ulysses_degree=2),
                     dense)
        exchange(results)
    else:
        for family, size in sizes.items():
            dense = run(family, "dense", size)
            for method in ("dense", "radial", "gna"):
                if method == "radial" and family == "flux":
                    continue  # radial does not serve Flux
                case(results, f"{family}/{method}/ring", family, method, size, ContextParallelConfig(ring_degree=2),
                     dense)
        case(results, "wan21/vmoba/ring", "wan21", "vmoba", sizes["wan21"], ContextParallelConfig(ring_degree=2))
        # ulysses_anything end to end: 243 visual tokens (3 frames of 9 x 9) split 122 / 121
        ragged = (9, 144, 144)
        dense = run("wan21", "dense", ragged)
        for method in ("dense", "radial", "gna_5x5"):  # (gna's default window covers this 9 x 9 grid whole)
            case(results, f"wan21/{method.split('_')[0]}/anything", "wan21", method, ragged,
                 ContextParallelConfig(ulysses_degree=2, ulysses_anything=True), dense)
        case(results, "wan21/radial/ring_anything", "wan21", "radial", ragged,
             ContextParallelConfig(ring_degree=2, ring_anything=True), dense)
        # enable_parallelism after apply, with a plan that splits the model's own inputs (Flux): refused
        pipe = tiny_pipeline("flux", seed=0)
        attnproc.apply(pipe, "dense")
        enable_cp(pipe.transformer, ContextParallelConfig(ulysses_degree=2))
        try:
            with torch.no_grad():
                pipe(**tiny_call_kwargs("flux", num_inference_steps=1, output_type="latent"))
            results["flux/apply_then_cp"] = {"error": None}
        except Exception as e:  # noqa: BLE001
            results["flux/apply_then_cp"] = {"error": f"{type(e).__name__}: {e}"}
        try:  # agent on a DiT (dit=True) under Ulysses: refused, saying why
            pipe = tiny_pipeline("wan21", seed=0)
            enable_cp(pipe.transformer, ContextParallelConfig(ulysses_degree=2))
            attnproc.apply(pipe, "agent", dit=True)
            results["wan21/agent"] = {"error": None}
        except Exception as e:  # noqa: BLE001
            results["wan21/agent"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            pipe = tiny_pipeline("wan21", seed=0)
            enable_cp(pipe.transformer, ContextParallelConfig(ulysses_degree=2))
            attnproc.apply(pipe, "vmoba", threshold_type="overall")
            results["wan21/vmoba_overall"] = {"error": None}
        except Exception as e:  # noqa: BLE001
            results["wan21/vmoba_overall"] = {"error": f"{type(e).__name__}: {e}"}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.exit(0)
