"""``attnproc bench``: named shapes match the models' published defaults, measured quantities follow their
definitions (density from the method's own mask, fraction of ideal, schedule share, Amdahl estimate), the kernel
record is exact and scoped, and the CLI checks its input."""
from __future__ import annotations

import inspect
import json

import diffusers
import pytest
import torch

import attnproc
from attnproc.kernels import block_sparse_attention, record_kernel_calls
from attnproc.workflows.bench import _estimate, bench, format_table, peak_bytes
from attnproc.workflows.bench_shapes import SHAPES, shape_named
from attnproc.workflows.cli import main


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("name, pipe, model, layers, size", [
    ("wan2.1-1.3b-480p", diffusers.WanPipeline, None, (), None),  # 1.3B widths are not diffusers' defaults
    ("wan2.1-14b-720p", diffusers.WanPipeline, diffusers.WanTransformer3DModel, ("num_layers",), (720, 1280)),
    ("hunyuanvideo-720p", diffusers.HunyuanVideoPipeline, diffusers.HunyuanVideoTransformer3DModel,
     ("num_layers", "num_single_layers"), None),
    ("flux-1024", diffusers.FluxPipeline, diffusers.FluxTransformer2DModel, ("num_layers", "num_single_layers"),
     (1024, 1024)),  # FluxPipeline takes its default size from the model config (128 * 8)
])
def test_named_shapes_match_diffusers_defaults(name, pipe, model, layers, size):
    """Grid = the pipeline's default size (or the model's usual one) / VAE 8 / patch 2, frames (F - 1) / 4 + 1;
    text = the pipeline's max_sequence_length, steps its default; heads, head dim and layers the transformer's
    defaults (the published large models)."""
    s = SHAPES[name]
    params = inspect.signature(pipe.__call__).parameters
    height, width = size or (params["height"].default, params["width"].default)
    frames = params["num_frames"].default if "num_frames" in params else 1
    assert (s.frames, s.height, s.width) == ((frames - 1) // 4 + 1, height // 16, width // 16)
    assert (s.text_len, s.steps) == (params["max_sequence_length"].default, params["num_inference_steps"].default)
    if model is not None:
        assert s.heads == _default(model.__init__, "num_attention_heads")
        assert s.head_dim == _default(model.__init__, "attention_head_dim")
        assert s.layers == sum(_default(model.__init__, n) for n in layers)
    assert (SHAPES["wan2.1-1.3b-480p"].visual_len, SHAPES["hunyuanvideo-720p"].visual_len) == (32760, 118800)
    assert SHAPES["hunyuanvideo-720p"].seq_len == 118800 + 256 and SHAPES["wan2.1-14b-720p"].seq_len == 75600


def test_scaled_shape_says_what_changed_and_refuses_bad_sizes():
    s = shape_named("WAN2.1-1.3B-480P").scaled(frames=4, heads=2)
    assert s.label() == "wan2.1-1.3b-480p (frames 21->4, heads 12->2)" and s.visual_len == 4 * 30 * 52
    assert s.scaled(width=8).label() == "wan2.1-1.3b-480p (frames 21->4, width 52->8, heads 12->2)"
    with pytest.raises(ValueError, match=r"frames: must be an integer in \[1, 21\] for wan2.1-1.3b-480p; got 30"):
        s.scaled(frames=30)
    with pytest.raises(ValueError, match="shape: unknown name 'wan3'"):
        shape_named("wan3")


def test_kernel_record_is_exact_and_scoped():
    q = torch.randn(1, 2, 40, 8)
    kv = torch.randn(1, 2, 24, 8)
    ek = torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[True, False], [True, True], [False, True]])[None, None]  # 3 q blocks x 2 k blocks of 16
    block_sparse_attention(q, kv, kv, mask, 16, extra_k=ek, extra_v=ek)  # outside: nothing recorded, no error
    with record_kernel_calls() as calls:
        block_sparse_attention(q, kv, kv, mask, 16, extra_k=ek, extra_v=ek, backend="gather")
    # rows 16, 16, 8 queries; key blocks 16 and 8 tokens: kept = 16*16 + 16*(16+8) + 8*8, plus 40 * 3 extra keys
    assert len(calls) == 1 and calls[0]["backend"] == "gather"
    assert calls[0]["kept_pairs"] == 2 * (16 * 16 + 16 * 24 + 8 * 8 + 40 * 3)
    assert calls[0]["pairs"] == 2 * 40 * (24 + 3) and calls[0]["ms"] > 0


def test_peak_bytes_sees_a_temporary_allocation():
    def make():
        x = torch.empty(4 * 2 ** 20, dtype=torch.uint8)
        x.fill_(1)
        return None
    assert peak_bytes(make, torch.device("cpu")) >= 4 * 2 ** 20
    assert peak_bytes(lambda: None, torch.device("cpu")) == 0


def test_bench_rows_follow_their_definitions():
    shape = shape_named("wan2.1-1.3b-480p").scaled(frames=4, height=8, width=8, heads=1)
    report = bench([("radial", {"block_size": 16}), "gna", "vmoba", "maskmod", "agent", "dense"], shape, repeats=2,
                   warmup=1, e2e=False, memory=False, progress=False)
    rows = {r["label"]: r for r in report["rows"]}
    radial = rows["radial (block_size=16)"]
    assert radial["status"] == "ok" and radial["backends"] == ["gather"]
    method = attnproc.create("radial", block_size=16)
    site = attnproc.Site("wan", "transformer", "blocks.29.attn1", 58, 29, "self", attnproc.TokenLayout(
        4, 8, 8, text_len=512, text_position="separate"), attnproc.StepContext(49, 50, 20.0))
    mask, _ = method.block_mask_for(site)
    assert radial["density"] == pytest.approx(mask.float().mean().item(), abs=1e-4) and radial["density"] < 1
    assert radial["frac_ideal"] == pytest.approx(radial["speedup"]["median"] * radial["density"], abs=2e-3)
    assert radial["kernel_ms"] + radial["overhead_ms"] == pytest.approx(radial["recorded_ms"], abs=1e-2)
    # Wan defaults: dense for the first 0.24 * 50 = 12 steps and the first layer of 30
    assert radial["sparse_share"] == pytest.approx((50 - 12) * (30 - 1) / (50 * 30))
    assert rows["gna"]["status"] == "ok" and 0 < rows["gna"]["density"] < 1
    assert 0 < rows["vmoba"]["density"] <= 1  # packed per-chunk kernel calls: computed pairs, not call sizes
    assert rows["maskmod"]["status"] == "skipped" and "steering edit" in rows["maskmod"]["reason"]
    assert rows["agent"]["status"] == "skipped" and "dit=True" in rows["agent"]["reason"]
    assert rows["dense"]["density"] is None and rows["dense"]["sparse_share"] is None
    json.dumps(report)
    table = format_table(report)
    assert "wan2.1-1.3b-480p (frames 21->4, height 30->8, width 52->8, heads 12->1)" in table
    assert "measured on " in table and "maskmod" in table and "skipped" in table


def test_estimate_is_amdahl_with_the_schedule_share():
    row = {"status": "ok", "time_ms": {"median": 25.0}, "dense_ms": {"median": 100.0}, "sparse_share": 0.5}
    est = _estimate(row, {"share": 0.8, "full_shape_share": 0.9})
    assert est["benchmarked"]["sparse_step"] == pytest.approx(1 / (0.2 + 0.8 * 0.25), abs=1e-3)
    assert est["benchmarked"]["whole_run"] == pytest.approx(1 / (0.2 + 0.8 * (0.5 * 0.25 + 0.5)), abs=1e-3)
    assert est["full_shape"]["sparse_step"] == pytest.approx(1 / (0.1 + 0.9 * 0.25), abs=1e-3)
    assert _estimate(row, None) is None and _estimate({"status": "skipped"}, {"share": 0.5}) is None


def test_one_block_model_gives_an_attention_share():
    shape = shape_named("wan2.1-1.3b-480p").scaled(frames=1, height=4, width=4, heads=1)
    report = bench(["dense"], shape, repeats=1, warmup=0, memory=False, progress=False)
    share = report["share"]
    assert 0 < share["attention_ms"] < share["block_ms"] and share["share"] == pytest.approx(
        share["attention_ms"] / share["block_ms"], abs=1e-3)
    assert share["full_shape_share"] > share["share"]  # attention grows as S^2, the rest as S
    assert report["rows"][0]["estimate"]["benchmarked"]["sparse_step"] == pytest.approx(
        1 / ((1 - share["share"]) + share["share"] * report["rows"][0]["time_ms"]["median"]
             / report["rows"][0]["dense_ms"]["median"]), abs=2e-3)


def test_cli_bench_json_and_errors(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--shape", "hunyuanvideo-720p", "--frames", "2", "--height", "8", "--width", "8", "--heads", "1",
            "--method", "radial", "-o", "block_size=32", "--method", "gna", "--repeats", "1", "--no-estimate",
            "--no-memory", "--quiet", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["options"] for r in report["rows"]] == [{"block_size": 32}, {}]
    assert report["shape"]["kind"] == "joint" and report["shape"]["seq_len"] == 2 * 8 * 8 + 256
    assert "radial (block_size=32)" in capsys.readouterr().out
    assert main(args[:11] + ["--method", "radial", "-o", "block_size=7", "--quiet"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert main(["bench", "--family", "wan", "--quiet"]) == 2
    assert "missing: --grid, --heads, --head-dim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "-o", "decay=0.5", "--method", "radial"])
    assert "give --method NAME before its options" in capsys.readouterr().err
