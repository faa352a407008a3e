"""attnproc under real diffusers context parallelism: torchrun, 2 CPU ranks, gloo (tests/core/scripts/cp_parity.py
sets diffusers' parallel config and hooks up the way enable_parallelism does, without its accelerator line)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "cp_parity.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT "):]))
    return results


@pytest.fixture(scope="module")
def ulysses():
    return _torchrun("ulysses")


@pytest.fixture(scope="module")
def ring():
    return _torchrun("ring")


@pytest.mark.parametrize("case", ["wan21/dense", "wan21/radial", "wan21/gna", "wan21/vmoba", "wan21/rectified",
                                  "wan21/maskmod", "hunyuanvideo/dense", "hunyuanvideo/radial", "hunyuanvideo/gna",
                                  "hunyuanvideo/vmoba", "hunyuanvideo/rectified", "hunyuanvideo/maskmod",
                                  "flux/dense", "flux/gna", "flux/rectified", "flux/maskmod",
                                  "wan21/sla", "hunyuanvideo/sla", "flux/sla",
                                  "exchange/self/wan", "exchange/cross/wan", "exchange/cross/ltx",
                                  "exchange/joint/flux", "exchange/joint/hunyuanvideo"])
def test_ulysses_degree_2_matches_one_process(ulysses, case):
    """Whole pipeline output (2 steps, fp32) under Ulysses degree 2 vs one process; ``exchange/*``: the exchange
    alone on ragged splits, output and gradients, with a per-head computation keyed on the global head index."""
    r = ulysses[case]
    assert "error" not in r, r
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r


@pytest.mark.parametrize("case", ["wan21/radial", "wan21/gna", "wan21/vmoba", "wan21/rectified", "wan21/maskmod",
                                  "hunyuanvideo/radial", "hunyuanvideo/gna", "hunyuanvideo/vmoba",
                                  "hunyuanvideo/rectified",
                                  "hunyuanvideo/maskmod", "flux/gna", "flux/maskmod",
                                  "wan21/sla", "hunyuanvideo/sla", "flux/sla"])
def test_the_sparse_cases_are_not_dense(ulysses, case):
    """Parity would be vacuous if the method ran dense: these differ from dense on one process."""
    assert ulysses[case]["vs_dense"] > 1e-3, ulysses[case]


RING_CASES = ["wan21/dense/ring", "wan21/radial/ring", "wan21/gna/ring", "hunyuanvideo/dense/ring",
              "hunyuanvideo/radial/ring", "hunyuanvideo/gna/ring", "flux/dense/ring", "flux/gna/ring"]


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_degree_2_matches_one_process(ring, case):
    """Static masks under Ring (attnproc/ring.py: needed shards and tiles only, merged by log-sum-exp): whole
    pipeline output vs one process; the skipping itself is counted in test_ring_plan.py."""
    r = ring[case]
    assert "error" not in r, r
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r
    if "dense" not in case:
        assert r["vs_dense"] > 1e-3, r  # the sparse pattern really ran


@pytest.mark.parametrize("case", ["wan21/dense/anything", "wan21/radial/anything", "wan21/gna/anything",
                                  "wan21/radial/ring_anything"])
def test_ulysses_anything_end_to_end_matches_one_process(ring, case):
    """ulysses_anything=True (and ring_anything=True under Ring) on 243 visual tokens (split 122 / 121 by
    diffusers): whole pipeline vs one process.
    The script gathers proj_out's ragged shards itself (gloo refuses diffusers' uneven all_gather; see
    docs/context_parallel.md)."""
    r = ring[case]
    assert "error" not in r, r
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r
    if "dense" not in case:
        assert r["vs_dense"] > 1e-3, r


def test_refusals_are_clear(ring):
    assert "does not support diffusers context parallelism in ring mode" in ring["wan21/vmoba/ring"]["error"]
    assert "ulysses_degree=N" in ring["wan21/vmoba/ring"]["error"]
    assert "call enable_parallelism(...) first" in ring["flux/apply_then_cp"]["error"]
    assert "threshold_type 'query_head' or 'head_global'" in ring["wan21/vmoba_overall"]["error"]
    agent = ring["wan21/agent"]["error"]
    assert "method 'agent' does not support diffusers context parallelism (ulysses mode)" in agent
    assert "it serves UNets, which diffusers' context parallelism does not shard" in agent


RENDER_JOBS = """
pipeline: tiny:flux
defaults: {steps: 2, height: 128, width: 128}
sweep:
  prompts: ["a red fox in the snow"]
  methods: [{method: gna, options: {dense_first_steps: 0, block_target: 32}}]
  seeds: [0]
"""


TRAIN = {"pipeline": "tiny:wan21", "method": "sla", "train": "method", "steps": 3, "lr": 0.01,
         "options": {"topk": 0.25, "block_q": 16, "block_k": 16, "dense_first_steps": 0, "dense_first_layers": 0},
         "prompt": "a red fox in the snow", "frames": 9, "height": 128, "width": 128, "data_steps": 2,
         "checkpoint_every": 100, "output": "unused"}


@pytest.fixture(scope="module")
def workflows(tmp_path_factory):
    """One torchrun launch: `attnproc render --cp` (Ulysses, then Ring) and `attnproc finetune` under CP."""
    tmp = tmp_path_factory.mktemp("cp-workflows")
    (tmp / "jobs.yaml").write_text(RENDER_JOBS)
    (tmp / "train.json").write_text(json.dumps(TRAIN))
    return tmp, _torchrun("workflows", str(tmp))


def test_render_with_cp_writes_the_single_process_render(workflows):
    """`attnproc render --cp ulysses=2` / `--cp ring=2` under torchrun (2 CPU ranks, gloo): one image written
    once, by the main process, with the pixels of the one-process render (to a rounding level), and the mode
    in its record."""
    import numpy as np
    from PIL import Image

    from attnproc.workflows.manifest import read_records
    from attnproc.workflows.render import render

    tmp_path, got = workflows
    render(tmp_path / "jobs.yaml", tmp_path / "single", progress=False)
    want = sorted((tmp_path / "single").glob("*.png"))
    assert len(want) == 1
    for mode in ("ulysses", "ring"):
        assert got[mode]["done"] == 1 and got[mode]["failed"] == 0, got
        files = sorted((tmp_path / mode).glob("*.png"))
        assert [f.name for f in files] == [want[0].name]
        a, b = (np.asarray(Image.open(p)).astype(int) for p in (files[0], want[0]))
        # Sharded matmuls (and Ring's log-sum-exp merge) round differently at ~1e-6: a value on a rounding edge
        # may flip one level (seen under both modes, depending on the thread count); anything more is a defect
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, (mode, np.abs(a - b).max(), (a != b).mean())
        records = [r for r in read_records(tmp_path / mode) if r.get("status") == "done"]
        assert len(records) == 1 and records[0]["context_parallel"] == f"{mode}=2"


def test_cp_option_errors_are_clear():
    from attnproc.workflows.cp import parse_cp

    assert (parse_cp("Ulysses=4").mode, parse_cp("ulysses=4").degree) == ("ulysses", 4)
    assert parse_cp(None) is None
    for bad in ("ulysses", "ulysses=1", "tensor=2", "ring=x"):
        with pytest.raises(ValueError, match=r"--cp must be MODE=N with MODE one of \['ulysses', 'ring'\]"):
            parse_cp(bad)
    with pytest.raises(ValueError, match=r"--cp ring=4: the launch has 2 process\(es\).*--nproc-per-node 4"):
        parse_cp("ring=4").check_world(2)


def test_finetune_with_cp_trains_what_one_process_trains(workflows):
    """`context_parallel: ulysses=2` under torchrun (tiny Wan 2.1, sla's projections, 3 steps): the same losses
    and final weights as one process. AdamW hides a constant gradient scale, so the loss scaling's premise is
    checked directly: the ranks' gradients sum to the one-process gradient."""
    from safetensors.torch import load_file

    from attnproc.workflows.finetune import finetune, parse_finetune_config

    tmp_path, got = workflows
    want = finetune(parse_finetune_config(dict(TRAIN, output=str(tmp_path / "single"))), progress=False)
    assert len(got["losses"]) == 3
    for a, b in zip(got["losses"], want.losses):
        assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], want.losses)
    wa, wb = load_file(got["weights"]), load_file(str(want.weights))
    assert sorted(wa) == sorted(wb) and wa
    scale = max(float(t.abs().max()) for t in wb.values())
    assert scale > 0.01  # the projections moved from zero
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wb) <= 1e-5 * scale
    g = got["grads"]
    assert g["params"] == g["params_cp"] > 0 and g["max_diff"] <= 1e-5 * g["scale"], g


def test_finetune_cp_field_errors_name_it():
    from attnproc.workflows.finetune import FinetuneConfigError, parse_finetune_config

    with pytest.raises(FinetuneConfigError, match=r"context_parallel: must be MODE=N with MODE one of"):
        parse_finetune_config(dict(TRAIN, context_parallel="ulysses"))
    assert parse_finetune_config(dict(TRAIN, context_parallel="Ring=2")).context_parallel == "ring=2"
