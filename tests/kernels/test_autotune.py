"""Measured ``auto`` backend choice (kernels/autotune.py): injected timings decide, the choice is cached per
machine in a JSON file, corrupt/foreign files are ignored with a warning, ``ATTNPROC_BACKEND`` overrides."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from attnproc.kernels import block_sparse_attention
from attnproc.kernels.autotune import AutotuneCacheWarning, BackendTuner, density_band, time_candidates, tune_key

N, BS = 256, 64  # 1 x 2 heads x 256 x 256 = 131072 pairs: tuned because the tuners below set min_pairs=1


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 32, generator=g) for _ in range(3))
    mask = torch.eye(N // BS, dtype=torch.bool)[None, None] | (torch.rand(1, 1, N // BS, N // BS, generator=g) < .4)
    return q, k, v, mask


class Injected:
    """A ``measure`` that returns fixed timings and counts how often it was asked."""

    def __init__(self, medians: dict[str, float]):
        self.medians, self.calls, self.offered = medians, 0, []

    def __call__(self, runs):
        self.calls += 1
        self.offered.append(sorted(runs))
        return {n: {"median_ms": self.medians[n], "min_ms": self.medians[n], "max_ms": self.medians[n]} for n in runs}


@pytest.mark.parametrize("medians, expected", [({"flex": 5.0, "gather": 9.0}, "flex"),
                                               ({"flex": 9.0, "gather": 5.0}, "gather")])
def test_choice_is_the_fastest_injected_backend_and_is_cached(tmp_path, medians, expected):
    tuner = BackendTuner(tmp_path, min_pairs=1, measure=Injected(medians))
    key = "cpu/test-class"
    ran = []
    runs = {n: (lambda n=n: ran.append(n)) for n in medians}
    name, reason = tuner.choose("cpu", key, runs)
    assert name == expected and "fastest when timed now" in reason
    saved = json.loads(tuner.path("cpu").read_text())
    assert saved["torch"] == torch.__version__ and saved["choices"][key]["backend"] == expected
    # a new process (fresh tuner on the same folder) reuses the file and times nothing
    again = BackendTuner(tmp_path, min_pairs=1, measure=Injected({}))
    assert again.choose("cpu", key, runs) == (expected, f"auto: measured earlier on this machine ({key})")
    assert again._measure.calls == 0 and ran == []


def test_block_sparse_attention_runs_the_measured_backend(tmp_path):
    """End to end on CPU with gather measured faster: auto runs gather (exact vs the dense oracle) and keys the
    choice by the call's class (dtype, head dim, pairs, block, density band)."""
    q, k, v, mask = _inputs()
    measure = Injected({"flex": 50.0, "gather": 1.0})
    tuner = BackendTuner(tmp_path, min_pairs=1, measure=measure)
    out = block_sparse_attention(q, k, v, mask, BS, tuner=tuner)
    ref = block_sparse_attention(q, k, v, mask, BS, backend="dense")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert measure.calls == 1 and measure.offered == [["flex", "gather"]]
    key = tune_key("cpu", torch.float32, head_dim=32, pairs=2 * N * N, block=(BS, BS),
                   density=float(mask.float().mean()), needs_grad=False, return_lse=False)
    assert tuner.choices("cpu")[key]["backend"] == "gather"
    block_sparse_attention(q, k, v, mask, BS, tuner=tuner)  # same class: no new timing
    assert measure.calls == 1
    block_sparse_attention(q[:, :1], k[:, :1], v[:, :1], mask, BS, tuner=tuner)  # half the pairs: another class
    assert measure.calls == 2


def test_calls_with_one_candidate_or_below_the_threshold_are_not_timed(tmp_path):
    q, k, v, mask = _inputs()
    measure = Injected({"flex": 1.0, "gather": 2.0})
    small = BackendTuner(tmp_path, min_pairs=10 ** 9, measure=measure)
    block_sparse_attention(q, k, v, mask, BS, tuner=small)
    tuned = BackendTuner(tmp_path, min_pairs=1, measure=measure)
    with torch.enable_grad():  # CPU with a gradient: only gather can serve it
        block_sparse_attention(q.requires_grad_(), k, v, mask, BS, tuner=tuned)
    assert measure.calls == 0


@pytest.mark.parametrize("content, why", [("{not json", "unreadable"),
                                         ('{"choices": [1, 2]}', "unreadable"),
                                         (None, "written for")])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content, why):
    tuner = BackendTuner(tmp_path, min_pairs=1, measure=Injected({"flex": 9.0, "gather": 1.0}))
    path = tuner.path("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:  # a valid file from another machine / torch: its choice (flex) must not be used
        content = json.dumps({**tuner.header("cpu"), "torch": "0.0.0-other", "choices": {"k": {"backend": "flex"}}})
    path.write_text(content)
    with pytest.warns(AutotuneCacheWarning, match=why):
        name, reason = tuner.choose("cpu", "k", {"flex": lambda: None, "gather": lambda: None})
    assert name == "gather" and "timed now" in reason
    rewritten = json.loads(path.read_text())  # replaced by a valid file for this machine
    assert rewritten["torch"] == torch.__version__ and rewritten["choices"]["k"]["backend"] == "gather"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BackendTuner(tmp_path, min_pairs=1).choose("cpu", "k", {"flex": None, "gather": None})[0] == "gather"


def test_environment_override(tmp_path, monkeypatch):
    q, k, v, mask = _inputs()
    measure = Injected({"flex": 1.0, "gather": 2.0})
    tuner = BackendTuner(tmp_path, min_pairs=1, measure=measure)
    for value in ("gather", "static", "dense"):
        monkeypatch.setenv("ATTNPROC_BACKEND", value)
        block_sparse_attention(q, k, v, mask, BS, tuner=tuner)
    assert measure.calls == 0  # forced or static: nothing timed
    monkeypatch.setenv("ATTNPROC_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"ATTNPROC_BACKEND must be one of .*'flex'.*'static'.*got 'fastest'"):
        block_sparse_attention(q, k, v, mask, BS, tuner=tuner)
    monkeypatch.setenv("ATTNPROC_BACKEND", "triton")  # cannot run on CPU without the interpreter: says so
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        block_sparse_attention(q, k, v, mask, BS, tuner=tuner)


def test_default_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    from attnproc.kernels.autotune import cache_dir, default_tuner

    monkeypatch.setenv("ATTNPROC_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and default_tuner(1).directory == tmp_path / "c"
    monkeypatch.delenv("ATTNPROC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "attnproc"


def test_time_candidates_measures_and_drops_failing_runs():
    x = torch.randn(64, 64)
    out = time_candidates({"fast": lambda: x + 1, "slow": lambda: [x @ x for _ in range(20)],
                           "broken": lambda: 1 / 0}, reps=3)
    assert out["fast"]["median_ms"] < out["slow"]["median_ms"]
    assert out["fast"]["min_ms"] <= out["fast"]["median_ms"] <= out["fast"]["max_ms"]
    assert out["broken"] == {"error": "ZeroDivisionError: division by zero"}


def test_density_bands():
    assert [density_band(d) for d in (1.0, 0.5, 0.49, 0.25, 0.2, 0.1, 0.05, 0.01)] == [
        "50-100%", "50-100%", "25-50%", "25-50%", "12.5-25%", "6.25-12.5%", "3.125-6.25%", "<3%"]


def test_choices_of_two_processes_are_merged_in_the_file(tmp_path):
    a = BackendTuner(tmp_path, min_pairs=1, measure=Injected({"flex": 1.0, "gather": 2.0}))
    b = BackendTuner(tmp_path, min_pairs=1, measure=Injected({"flex": 2.0, "gather": 1.0}))
    runs = {"flex": None, "gather": None}
    assert b.choices("cpu") == {}  # b read the (absent) file before a wrote it
    assert a.choose("cpu", "class-a", runs)[0] == "flex"
    assert b.choose("cpu", "class-b", runs)[0] == "gather"
    saved = json.loads(a.path("cpu").read_text())["choices"]
    assert {k: e["backend"] for k, e in saved.items()} == {"class-a": "flex", "class-b": "gather"}
