"""The example job files render end to end (not only validate): every method in them supports its pipeline."""
import json
from pathlib import Path

import pytest

from attnproc.workflows.cli import main

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("jobfile", EXAMPLES, ids=lambda p: p.name)
def test_example_renders(jobfile, tmp_path):
    out = tmp_path / "renders"
    assert main(["render", str(jobfile), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "done" for r in records)
    assert all((out / r["output"]).exists() for r in records)
