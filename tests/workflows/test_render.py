"""`attnproc render`: sweep, manifest, resume after a kill, --compare, video output, 2-process accelerate run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnproc.workflows.jobs import load_jobfile
from attnproc.workflows.manifest import MANIFEST, PARTS, read_records
from attnproc.workflows.render import job_records, render

ROOT = Path(__file__).resolve().parents[2]
# Subprocesses import tests/conftest.py's test methods through this bootstrap (knobs is registered there).
BOOT = "import sys; sys.path.insert(0, {tests!r}); import conftest; from attnproc.workflows.cli import main; " \
       "sys.exit(main(sys.argv[1:]))"

SWEEP = """
pipeline: tiny:sd15
defaults: {steps: 2, height: 64, width: 64, negative_prompt: blurry}
sweep:
  prompts: ["a red fox in the snow", "a blue bird on a branch"]
  methods: [dense, {method: knobs, options: {strength: 0.25}}]
  seeds: [0, 1]
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # same threads in 1- and 2-process runs
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _cli(*args):
    return [sys.executable, "-c", BOOT.format(tests=str(ROOT / "tests")), *args]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def _pixels(path):
    return np.asarray(Image.open(path))


def _check_complete(jf, out):
    records = job_records(jf, out)
    assert [r["job"] for r in records] == list(range(8))
    assert {r["hash"] for r in records} == {jf.hash_of(j) for j in jf.jobs}
    for r in records:
        assert r["status"] == "done" and (out / r["output"]).is_file()
        assert r["kind"] == "image" and r["shape"] == [1, 64, 64, 3]
        t = r["timings"]  # one run each (no --compare): median = min = max = that run
        assert t["repeats"] == 1 and t["total_s"]["runs"] == [t["total_s"]["median"]]
        assert t["total_s"]["median"] > 0 and 0 < t["attention_s"]["median"] <= t["total_s"]["median"]
        assert t["attention_calls"] > 0
        assert r["peak_memory"]["kind"] == "cpu_process_peak_rss" and r["peak_memory"]["bytes"] > 0
        assert r["config"]["method"] == r["method"] and r["seed"] == r["config"]["seed"]
        assert set(r["config"]) >= {"pipeline", "prompt", "negative_prompt", "steps", "height", "width", "options"}
    knobs = next(r for r in records if r["method"] == "knobs")
    assert knobs["method_options"]["strength"] == 0.25 and "mode" in knobs["method_options"]  # full, validated
    assert not (out / PARTS).exists()
    return records


def test_sweep_killed_then_resumed_and_two_processes_match(tmp_path):
    jobfile = tmp_path / "sweep.yaml"
    jobfile.write_text(SWEEP)
    jf = load_jobfile(jobfile)
    out = tmp_path / "one"
    # 1) start, kill once two jobs are recorded
    proc = subprocess.Popen(_cli("render", str(jobfile), "--out", str(out), "--quiet"), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    recorded = []
    while time.time() < deadline and proc.poll() is None:
        recorded = [r for r in read_records(out) if r.get("status") == "done"]
        if len(recorded) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the render finished before it could be killed"
    first = {r["hash"]: r for r in read_records(out) if r.get("status") == "done"}
    assert 2 <= len(first) < 8
    mtimes = {h: (out / r["output"]).stat().st_mtime_ns for h, r in first.items()}
    # 2) re-run: finishes, does not redo the finished jobs
    done = subprocess.run(_cli("render", str(jobfile), "--out", str(out), "--quiet"), env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(first) and summary["done"] == 8 and summary["failed"] == 0
    records = _check_complete(jf, out)
    for r in records:
        if r["hash"] in first:
            assert r["finished_at"] == first[r["hash"]]["finished_at"]  # the old record, not a new render
            assert (out / r["output"]).stat().st_mtime_ns == mtimes[r["hash"]]
    # 3) a third run has nothing to do
    again = subprocess.run(_cli("render", str(jobfile), "--out", str(out), "--quiet"), env=_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] == 8
    # 4) the same job file on 2 processes (accelerate, CPU/gloo) gives the same outputs and one manifest
    out2 = tmp_path / "two"
    # what `accelerate launch -m attnproc render ...` runs, plus conftest's test-only `knobs` method
    boot = tmp_path / "attnproc_main.py"
    boot.write_text(f"import sys, runpy; sys.path.insert(0, {str(ROOT / 'tests')!r}); import conftest\n"
                    "runpy.run_module('attnproc', run_name='__main__')\n")
    # `accelerate launch`, run by this interpreter (so its workers import this checkout, whatever is on PATH)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                          str(boot), "render", str(jobfile), "--out", str(out2), "--quiet"],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    records2 = _check_complete(jf, out2)
    assert {r["rank"] for r in records2} == {0, 1} and {r["world_size"] for r in records2} == {2}
    for a, b in zip(records, records2):
        assert a["hash"] == b["hash"] and a["output"] == b["output"]
        np.testing.assert_array_equal(_pixels(out / a["output"]), _pixels(out2 / b["output"]))


def test_compare_dense_records_difference_and_speedup(tmp_path):
    jobfile = tmp_path / "cmp.json"
    jobfile.write_text(json.dumps({"pipeline": "tiny:sd15", "output": "renders",
                                   "jobs": [{"prompt": "a fox", "steps": 1, "height": 64, "width": 64,
                                             "method": "knobs", "options": {"strength": 0.5}}]}))
    summary = render(jobfile, compare="dense", repeats=2, progress=False)
    out = tmp_path / "renders"
    assert summary["done"] == 1 and Path(summary["out_dir"]) == out
    (rec,) = _manifest(out)
    cmp = rec["compare"]
    assert cmp["method"] == "dense" and (out / cmp["output"]).is_file()
    assert cmp["max_abs_diff"] == 0.0 and cmp["psnr_db"] is None  # knobs' "sparse" path is dense attention
    for timings in (rec["timings"], cmp["timings"]):  # warm-up + 2 timed runs each, total and attention apart
        assert (timings["repeats"], timings["warmup"]) == (2, 1)
        for key in ("total_s", "attention_s"):
            t = timings[key]
            assert len(t["runs"]) == 2 and t["min"] <= t["median"] <= t["max"] and t["min"] > 0
        assert timings["attention_s"]["max"] <= timings["total_s"]["max"]
    for kind in ("total", "attention"):
        ratios = cmp["speedup"][kind]
        assert len(ratios["runs"]) == 2 and isinstance(ratios["within_noise"], bool)
    assert cmp["within_noise"] == cmp["speedup"]["total"]["within_noise"] and cmp["verdict"].startswith("knobs")
    # a plain re-run with --compare keeps it; without --compare it is finished too
    assert render(jobfile, compare="dense", progress=False)["skipped"] == 1
    assert render(jobfile, progress=False)["skipped"] == 1


def test_video_job_writes_mp4_and_error_is_recorded(tmp_path):
    jobfile = tmp_path / "video.yaml"
    jobfile.write_text("pipeline: tiny:wan21\nfps: 4\ndefaults: {steps: 1, frames: 5}\njobs:\n"
                       "  - {prompt: waves, name: waves}\n"
                       "  - {prompt: bad, call: {latents: not a tensor}}\n")  # fails only mid-render
    summary = render(jobfile, tmp_path / "out", progress=False)
    records = _manifest(tmp_path / "out")
    assert summary["failed"] == 1 and [r["status"] for r in records] == ["done", "error"]
    video = tmp_path / "out" / records[0]["output"]
    assert records[0]["kind"] == "video" and records[0]["shape"][0] == 5
    assert (video.suffix == ".mp4" and video.stat().st_size > 0) or video.is_dir()
    assert "Error" in records[1]["error"] and records[1]["config"]["call"] == {"latents": "not a tensor"}


ONE_JOB = "pipeline: tiny:sd15\\ndefaults: {{steps: 1, height: 64, width: 64}}\\njobs:\\n{jobs}"


def test_two_job_files_share_one_append_only_manifest(tmp_path):
    """A second job file rendered into the same folder adds to the manifest; rerunning the first redoes nothing."""
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(ONE_JOB.format(jobs="  - {prompt: a fox}\n  - {prompt: a bird, seed: 1}\n").replace("\\n", "\n"))
    second.write_text(ONE_JOB.format(jobs="  - {prompt: a cat}\n").replace("\\n", "\n"))
    out = tmp_path / "out"
    s1 = render(first, out, progress=False)
    assert (s1["jobs"], s1["skipped"], s1["rendered"], s1["done"], s1["failed"]) == (2, 0, 2, 2, 0)
    before = (out / MANIFEST).read_text()
    s2 = render(second, out, progress=False)
    assert (s2["jobs"], s2["skipped"], s2["rendered"], s2["done"], s2["failed"]) == (1, 0, 1, 1, 0)
    after = (out / MANIFEST).read_text()
    assert after.startswith(before) and len(after.splitlines()) == 3  # appended, nothing dropped
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = render(first, out, progress=False)
    assert (again["skipped"], again["rendered"], again["done"]) == (2, 0, 2)
    assert (out / MANIFEST).read_text() == after  # nothing redone, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    records = [json.loads(line) for line in after.splitlines()]
    assert [Path(r["jobfile"]).name for r in records] == ["first.yaml", "first.yaml", "second.yaml"]
    assert len({r["record_id"] for r in records}) == 3


def test_rerun_removes_what_a_killed_writer_left(tmp_path):
    from attnproc.workflows.media import TEMP_MARK

    job = tmp_path / "job.yaml"
    job.write_text(ONE_JOB.format(jobs="  - {prompt: a fox}\n").replace("\\n", "\n"))
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".fox.mp4{TEMP_MARK}{int(dead.stdout)}-0a1b2c3d.tmp.mp4"  # a writer killed mid-write
    stale.write_bytes(b"half a video")
    live = out / f".other.png{TEMP_MARK}{os.getpid()}-0a1b2c3d.tmp.png"  # a live writer's file stays
    live.write_bytes(b"being written")
    render(job, out, progress=False)
    assert not stale.exists() and live.exists()


def test_outputs_follow_the_users_umask(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(ONE_JOB.format(jobs="  - {prompt: a fox}\n").replace("\\n", "\n"))
    old = os.umask(0o022)
    try:
        render(job, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    (rec,) = job_records(load_jobfile(job), tmp_path / "out")
    for path in (tmp_path / "out" / rec["output"], tmp_path / "out" / MANIFEST):
        assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
