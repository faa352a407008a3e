"""The README and docs/interfaces.md tell the truth: every command they show is run (or, where it cannot run
here, checked), and the shared-options table matches the registry.

Commands are taken from indented and unlabelled fenced code blocks and from inline code that starts with
``attnproc``. Each is run as shown, in a scratch folder holding a copy of ``examples/`` and a one-job
``jobs.yaml`` (tiny pipelines), with two changes that keep the suite fast and safe: ``--repeats 1`` for the demo
and a free port for the UI. A synopsis (``[--flag]``, ALL-CAPS placeholders) is checked against the parser: every
flag it shows must exist. ``pip install`` lines are checked against pyproject.toml, benchmark lines against the
script's ``--help``; the test-suite line is the one thing not run (it would run this test).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import attnproc
from attnproc.workflows.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "interfaces.md"]
JOBS_YAML = "pipeline: tiny:sd15\ndefaults: {steps: 1, height: 64, width: 64}\njobs:\n  - {prompt: a red fox}\n"
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b")


def commands(path: Path) -> list[str]:
    """Shell commands shown in a markdown file, comments stripped, ``&&`` chains split."""
    text = path.read_text()
    found = []
    in_fence, lang = False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence, lang = (not in_fence), line[3:].strip()
            continue
        if (in_fence and lang in ("", "sh", "bash", "shell")) or (not in_fence and line.startswith("    ")):
            code = line.split(" #", 1)[0].strip()
            if code and not code.startswith(("#", "|")) and re.match(r"^(attnproc|python|pip|accelerate)\b", code):
                found += [c.strip() for c in code.split("&&")]
    flat = re.sub(r"\s*\n\s*", " ", text)  # inline code may wrap across lines
    found += [m.group(1) for m in re.finditer(r"`((?:attnproc |python -m attnproc |python benchmarks/)[^`]*)`", flat)]
    return list(dict.fromkeys(found))


ALL = list({c: (p.name, c) for p in reversed(DOCS) for c in commands(p)}.values())  # each command once


def _attnproc_args(argv: list[str]) -> list[str] | None:
    """The attnproc arguments of a command line (after `attnproc`, `python -m attnproc` or `-m attnproc`)."""
    for i, word in enumerate(argv):
        if word == "attnproc" and (i == 0 or argv[i - 1] == "-m"):
            return argv[i + 1:]
    return None


def _flags(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scratch(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "jobs.yaml").write_text(JOBS_YAML)
    return tmp_path


def test_the_docs_show_commands():
    kinds = {c.split()[0] for _, c in ALL}
    assert {"attnproc", "pip", "python", "accelerate"} <= kinds, ALL
    assert len(ALL) >= 12, ALL


@pytest.mark.parametrize("doc, command", ALL, ids=[c for _, c in ALL])
def test_command(doc, command, scratch):
    argv = shlex.split(command)
    if argv[0] == "pip":
        _check_pip(argv)
        return
    if argv[:3] == ["python", "-m", "pytest"]:
        assert "pytest" in (ROOT / ".ci" / "run").read_text()  # what CI runs; running it here would recurse
        return
    if argv[0] == "python" and argv[1].startswith("benchmarks/"):
        _check_benchmark(argv)
        return
    args = _attnproc_args(argv)
    assert args is not None, f"{doc}: not an attnproc command: {command}"
    if args in (["…"], ["..."]):  # "python -m attnproc …": the module runs the same CLI
        assert subprocess.run([sys.executable, "-m", "attnproc", "--help"], capture_output=True).returncode == 0
        return
    if "[" in command or "..." in command or PLACEHOLDER.search(" ".join(args)):
        _check_synopsis(doc, command, args)
        return
    if args[0] == "ui":
        _run_ui(args, scratch)
        return
    if args[0] == "demo":
        args = args + ["--repeats", "1", "--quiet"]
    if args[0] == "render":
        args = args + ["--quiet"]
    cmd = ([sys.executable, "-m", "attnproc", *args] if argv[0] != "accelerate"
           else [sys.executable, "-m", "accelerate.commands.launch", *argv[2:argv.index("-m")], "--main_process_port", str(_free_port()),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 *argv[argv.index("-m"):], "--quiet"])
    proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{doc}: `{command}` failed:\n{proc.stderr[-3000:]}"
    _check_outputs(args, proc.stdout, scratch)


def _check_outputs(args: list[str], stdout: str, cwd: Path) -> None:
    """What the docs say the command writes is there."""
    if args[0] == "demo":
        report = json.loads((cwd / "attnproc-demo" / "report.json").read_text())
        method = args[args.index("--method") + 1] if "--method" in args else "dense"
        assert report["method"] == method and Path(report["runs"]["dense"]["output"]).name in (
            "dense.mp4", "dense_frames", "dense.png")
        assert (cwd / report["runs"]["dense"]["output"]).exists()
        if method != "dense":
            assert report["mask_picture"] == str(Path("attnproc-demo") / f"{method}-mask.png")
    elif args[0] == "render" and "--dry-run" not in args:
        out = cwd / args[args.index("--out") + 1] if "--out" in args else None
        jobfile = Path(args[1])
        out = out or (cwd / jobfile.parent / "renders" / "sweep" if jobfile.name == "sweep_tiny.yaml"
                      else cwd / f"{jobfile.stem}-render")
        summary = json.loads(stdout[stdout.index("{"):]) if "{" in stdout else None
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert records and all(r["status"] == "done" for r in records)
        if summary is not None:
            assert summary["failed"] == 0 and summary["done"] == summary["jobs"]
        if "--compare" in args:
            assert all("verdict" in r["compare"] for r in records)
    elif args[0] == "methods":
        assert "dense" in stdout
    elif args[0] == "export-comfy":
        assert (cwd / args[1] / "nodes.py").is_file()


def _run_ui(args: list[str], cwd: Path) -> None:
    """Start the UI as shown (on a free port), wait until it answers, stop it."""
    port = _free_port()
    if "--port" in args:
        args = list(args)
        args[args.index("--port") + 1] = str(port)
    else:
        args = args + ["--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "attnproc", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200 and b"attnproc" in r.read()
                    return
            except OSError:
                time.sleep(1)
        pytest.fail(f"attnproc {' '.join(args)} did not answer within 180 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_synopsis(doc: str, command: str, args: list[str]) -> None:
    parser = build_parser()
    sub = args[0]
    assert sub in next(a for a in parser._actions if a.dest == "command").choices, f"{doc}: unknown command {sub}"
    shown = {w.strip("[]") for w in args if w.strip("[]").startswith("-")}
    unknown = shown - _flags(parser, sub) - {"..."}
    assert not unknown, f"{doc}: `{command}` shows options attnproc {sub} does not have: {sorted(unknown)}"


def _check_pip(argv: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in argv[2:]:
        if spec == "-e":
            continue
        name, extras = re.match(r"^([^\[=]+)(?:\[(.*)\])?", spec.strip("\"'")).groups()
        if name.startswith("torch"):
            assert spec in (ROOT / ".ci" / "run").read_text(), f"{spec} is not what CI installs"
            continue
        assert name in (".", project["name"]), spec
        for extra in (extras or "").split(","):
            assert not extra or extra in project["optional-dependencies"], f"no extra {extra!r}"


def _check_benchmark(argv: list[str]) -> None:
    script = ROOT / argv[1]
    assert script.is_file(), argv[1]
    flags = [a for a in argv[2:] if a.startswith("--")]
    if flags:
        text = script.read_text()
        assert all(f'"{f}"' in text for f in flags), f"{argv[1]} has no {flags}"


def test_shared_options_table_matches_the_registry():
    """The README's table shows each sparse method's real default: a value, or 'automatic' where the method
    picks it per family (default None)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Options shared by every sparse method"):]
    rows = [line for line in section.splitlines()[2:] if line.startswith("| `")]
    header = next(line for line in section.splitlines() if line.startswith("| option"))
    methods = [c.strip().strip("`") for c in header.strip("|").split("|")[1:-1]]
    infos = {m.name: {o.name: o for o in m.options} for m in attnproc.methods()}
    assert methods and all(m in infos for m in methods), methods
    shared = {o.name for o in attnproc.options.option_infos(attnproc.Schedule)}
    assert {r.split("`")[1] for r in rows} == shared
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        for method, cell in zip(methods, cells[1:]):
            default = infos[method][name].default
            if default is None:
                assert cell.startswith("automatic"), (method, name, cell)
            else:
                assert cell.split()[0].strip("`") == repr(default), (method, name, cell, default)
