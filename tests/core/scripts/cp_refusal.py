"""Run under torchrun (2 CPU processes, gloo): attnproc must refuse diffusers context parallelism clearly."""
import json
import sys

import torch
import torch.distributed as dist

import attnproc
from attnproc.pipelines import tiny_pipeline

torch.accelerator.device_count = lambda: 1  # CPU stand-in so diffusers accepts the gloo world
dist.init_process_group("gloo")
from diffusers import ContextParallelConfig  # noqa: E402

results = {}
pipe = tiny_pipeline("wan21")
model = pipe.transformer
x = torch.randn(1, model.config.in_channels, 3, 16, 16)
t = torch.tensor([500.0])
ctx = torch.randn(1, 8, model.config.text_dim)

model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
try:
    attnproc.apply(pipe, "dense")
    results["apply_after_cp"] = "applied"
except RuntimeError as e:
    results["apply_after_cp"] = str(e)

pipe2 = tiny_pipeline("wan21")
attnproc.apply(pipe2, "dense")
pipe2.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
try:
    with torch.no_grad():
        pipe2.transformer(x, t, ctx)
    results["forward_cp_after_apply"] = "ran"
except RuntimeError as e:
    results["forward_cp_after_apply"] = str(e)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(results))
dist.destroy_process_group()
sys.exit(0)
