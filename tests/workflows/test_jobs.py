"""Job files: schema validation (errors name the field) and sweep expansion."""
import json

import pytest

from attnproc.workflows.cli import main
from attnproc.workflows.jobs import JobFileError, load_jobfile, parse_jobfile

BASE = {"pipeline": "tiny:sd15", "defaults": {"steps": 2, "height": 64, "width": 64}}


def test_sweep_expands_prompts_methods_seeds():
    jf = parse_jobfile({**BASE, "sweep": {"prompts": ["a", "b"], "seeds": [0, 1],
                                          "methods": ["dense", {"method": "knobs", "options": {"strength": 0.25}}]}})
    assert len(jf.jobs) == 8
    combos = {(j.prompt, j.method, j.seed) for j in jf.jobs}
    assert combos == {(p, m, s) for p in "ab" for m in ("dense", "knobs") for s in (0, 1)}
    assert len({jf.hash_of(j) for j in jf.jobs}) == 8
    knobs = next(j for j in jf.jobs if j.method == "knobs")
    assert knobs.options == {"strength": 0.25} and knobs.steps == 2 and knobs.height == 64


def test_jobs_and_sweep_combine_and_hash_ignores_name():
    jf = parse_jobfile({**BASE, "jobs": [{"prompt": "x", "name": "first"}, {"prompt": "x"}],
                        "sweep": {"prompts": ["y"]}})
    assert [j.index for j in jf.jobs] == [0, 1, 2]
    assert jf.hash_of(jf.jobs[0]) == jf.hash_of(jf.jobs[1])  # same config → same job for resume
    assert jf.jobs[2].method == "dense" and jf.jobs[2].seed == 0


@pytest.mark.parametrize("data, field", [
    ({"defaults": {}}, "pipeline"),
    ({**BASE, "jobs": [{"prompt": "a", "seed": "x"}]}, "jobs[0].seed"),
    ({**BASE, "jobs": [{"prompt": "a"}, {"prompt": "b", "steps": 0}]}, "jobs[1].steps"),
    ({**BASE, "jobs": [{"prompt": "a", "method": "nosuch"}]}, "jobs[0].method"),
    ({**BASE, "jobs": [{"prompt": "a", "method": "knobs", "options": {"strength": 7}}]}, "jobs[0].options"),
    ({**BASE, "jobs": [{"prompt": "a", "method": "knobs", "options": {"nosuch": 1}}]}, "jobs[0].options"),
    ({**BASE, "jobs": [{"prompt": "a", "colour": "red"}]}, "jobs[0].colour"),
    ({**BASE, "jobs": [{"seed": 1}]}, "jobs[0].prompt"),
    ({**BASE, "jobs": [{"prompt": "a", "height": 65}]}, "jobs[0].height"),
    ({**BASE, "defaults": {"width": "wide"}, "jobs": [{"prompt": "a"}]}, "defaults.width"),
    ({**BASE, "sweep": {"prompts": "a"}}, "sweep.prompts"),
    ({**BASE, "sweep": {"prompts": ["a"], "methods": ["dense", "nosuch"]}}, "sweep.methods[1]"),
    ({**BASE, "sweep": {"prompts": ["a"], "seeds": [0, -1]}}, "sweep.seeds[1]"),
    ({**BASE, "sweep": {"prompts": ["a"], "methods": [{"method": "knobs", "options": {"width": 4}}]}},
     "sweep.methods[0].options"),
    ({**BASE, "pipeline": "tiny:nosuch", "jobs": [{"prompt": "a"}]}, "pipeline"),
    ({**BASE, "pipeline_options": {"dtype": "float8"}, "jobs": [{"prompt": "a"}]}, "pipeline_options.dtype"),
    ({**BASE}, "jobs"),
    ({**BASE, "jobz": []}, "jobz"),
])
def test_bad_job_files_name_the_field(data, field):
    with pytest.raises(JobFileError) as e:
        parse_jobfile(data)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_yaml_and_json_files_and_cli_errors(tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text("pipeline: tiny:sd15\njobs:\n  - prompt: a fox\n    seed: 3\n")
    jf = load_jobfile(tmp_path / "ok.yaml")
    assert jf.jobs[0].seed == 3
    (tmp_path / "bad.json").write_text(json.dumps({**BASE, "jobs": [{"prompt": "a", "seed": -2}]}))
    assert main(["render", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.json: jobs[0].seed: must be an integer >= 0" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.yaml").write_text("pipeline: [unclosed\n")
    assert main(["render", str(tmp_path / "broken.yaml"), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "ok.yaml"), "--dry-run"]) == 0
    assert '"seed": 3' in capsys.readouterr().out


@pytest.mark.parametrize("pipeline, job, message", [
    ("tiny:flux", {"prompt": "a", "method": "radial"}, "jobs[1].method: method 'radial' cannot run on tiny:flux"),
    ("tiny:sd15", {"prompt": "a", "frames": 9}, "jobs[1].frames: tiny:sd15 (StableDiffusionPipeline) takes no "
                                                 "'num_frames' (an image pipeline)"),
    ("tiny:wan21", {"prompt": "a", "call": {"colour": 1}}, "jobs[1].call.colour: tiny:wan21"),
])
def test_dry_run_checks_every_job_against_the_pipeline(tmp_path, capsys, pipeline, job, message):
    """Mistakes that used to pass --dry-run and fail mid-render are refused before anything renders."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({**BASE, "pipeline": pipeline, "defaults": {"steps": 1},
                                "jobs": [{"prompt": "fine"}, job]}))
    assert main(["render", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert main(["render", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing rendered, not even the first, valid job


def test_family_check_reads_the_config_not_the_weights(tmp_path):
    """A saved pipeline without its weight files: the check still knows the family (meta-device denoisers)."""
    from attnproc.pipelines import tiny_pipeline
    from attnproc.workflows.preflight import PreflightError, check_method, pipeline_facts

    folder = tmp_path / "flux"
    tiny_pipeline("flux").save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    facts = pipeline_facts(str(folder))
    assert facts.families == {"transformer": "flux"} and not facts.video
    assert next(facts.target.transformer.parameters()).device.type == "meta"
    check_method(facts, "gna", {})  # served
    with pytest.raises(PreflightError, match="method 'radial' cannot run on .*does not support the model family"):
        check_method(facts, "radial", {})


def test_maskmod_prompt_comes_from_the_job_and_a_mismatch_is_refused():
    regions = [{"phrase": "a red fox", "box": [0, 0, 0.5, 1]}]
    jf = parse_jobfile({**BASE, "jobs": [{"prompt": "a red fox in the snow", "method": "maskmod",
                                          "options": {"regions": regions}}]})
    assert jf.jobs[0].options["prompt"] == "a red fox in the snow"  # taken from the job
    with pytest.raises(JobFileError, match=r"jobs\[0\].options: option 'prompt' of method 'maskmod' is 'a red fox "
                                           r"on a hill' but the pipeline renders 'a red fox in the snow'"):
        parse_jobfile({**BASE, "jobs": [{"prompt": "a red fox in the snow", "method": "maskmod",
                                         "options": {"regions": regions, "prompt": "a red fox on a hill"}}]})
    composed = parse_jobfile({**BASE, "jobs": [{"prompt": "a red fox in the snow", "method": ["dense", "maskmod"],
                                                "options": {"maskmod": {"regions": regions}}}]})
    assert composed.jobs[0].options == {"maskmod": {"regions": regions, "prompt": "a red fox in the snow"}}


def test_compare_method_is_checked_against_the_pipeline_too(tmp_path):
    from attnproc.workflows.preflight import PreflightError
    from attnproc.workflows.render import render

    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({**BASE, "jobs": [{"prompt": "a"}]}))
    with pytest.raises(PreflightError, match="method 'radial' cannot run on tiny:sd15"):
        render(path, tmp_path / "out", compare="radial", progress=False)
    assert not (tmp_path / "out").exists()
