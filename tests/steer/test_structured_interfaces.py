"""structured through the interfaces generated from the registry: job files (render and dry run), the UI's
renderer (phrases typed as text), and ComfyUI (its own node; the generic override refuses it clearly)."""
import json

import pytest

import attnproc
from attnproc.workflows.cli import main

PROMPT = "a red circle and a blue square"


def _jobfile(tmp_path, options, prompt=PROMPT):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({"pipeline": "tiny:sd15", "defaults": {"steps": 1, "height": 64, "width": 64},
                                "jobs": [{"prompt": prompt, "method": "structured", "options": options}]}))
    return path


def test_job_file_renders_and_bad_phrases_are_refused_before_rendering(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["render", str(_jobfile(tmp_path, {"phrases": ["a red circle", "a blue square"]})),
                 "--out", str(out), "--quiet"]) == 0
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest[-1]["method"] == "structured"
    assert manifest[-1]["method_options"]["prompt"] == PROMPT  # taken from the job
    bad = tmp_path / "bad"
    bad.mkdir()
    assert main(["render", str(_jobfile(bad, {"phrases": ["a green circle"]})), "--out", str(bad / "out"),
                 "--quiet"]) == 2
    assert "'a green circle' is not in the prompt" in capsys.readouterr().err
    assert not (bad / "out").exists()


def test_ui_renderer_takes_phrases_as_text():
    from attnproc.ui.app import Renderer, widget_spec

    infos = {o.name: o for o in next(m for m in attnproc.methods() if m.name == "structured").options}
    assert widget_spec(infos["mode"])["kind"] == "dropdown" and widget_spec(infos["parser"])["kind"] == "dropdown"
    res = Renderer().generate("tiny:sd15", "structured", PROMPT, steps=1, height=64, width=64, compare=False,
                              repeats=1, options={"phrases": "a red circle; a blue square"})
    assert res["options"]["phrases"] == "a red circle; a blue square" and res["options"]["prompt"] == PROMPT
    with pytest.raises(ValueError, match="phrases 'a red circle' and 'red circle and' overlap"):
        Renderer().generate("tiny:sd15", "structured", PROMPT, steps=1, compare=False, repeats=1,
                            options={"phrases": "a red circle\nred circle and"})


def test_comfyui_has_its_own_node_and_the_override_says_so():
    """The attention override (q, k, v only) cannot serve structured; the pack has its own node for it
    (workflows/comfy_steer.py, tested in the real engine in tests/workflows/test_comfy_steer.py)."""
    from attnproc.workflows.comfy import node_specs
    from attnproc.workflows.comfy_runtime import install

    assert [s["node_id"] for s in node_specs(["structured"])] == ["AttnProcStructured"]

    class ModelPatcher:
        model = type("BaseModel", (), {})()
        model_options = {"transformer_options": {}}

    with pytest.raises(ValueError, match="'structured' needs per-module state or the transformer block's input "
                                         r"\(or the module's projections and text context\).*own node "
                                         "'AttnProcStructured'"):
        install(ModelPatcher(), attnproc.create("structured", prompt=PROMPT))
