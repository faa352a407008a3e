"""Key-locking through the interfaces: a render job file and the UI's renderer take concept files with a β per
concept, the output is the library's, and the pipeline's vocabulary is restored after each render."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnproc
from attnproc.pipelines import concepts as cc
from attnproc.pipelines import tiny_call_kwargs, tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("keylock-ui")
    pipe = tiny_pipeline("sd15")
    con = cc.initial_concept(pipe, "<flag>", "fox", ["a {}"])
    g = torch.Generator().manual_seed(1)
    for t in con.values.values():
        t.add_(torch.randn(t.shape, generator=g))
    cov = cc.estimate_covariance(pipe, ["a red fox in the snow", "a fox"])
    concept = cc.save_concept(con, root / "flag.safetensors")
    covariance = cc.save_covariance(cov, root / "C.safetensors", text_encoder=con.text_encoder, captions=2, ridge=1e-3)
    return pipe, str(concept), str(covariance)


def _library_image(pipe, concept, covariance, beta):
    attnproc.apply(pipe, "keylock", concepts=[{"file": concept, "beta": beta}], covariance=covariance)
    try:
        kw = tiny_call_kwargs("sd15", prompt="a <flag>", num_inference_steps=2, height=64, width=64,
                              output_type="np")
        kw["generator"] = torch.Generator().manual_seed(0)
        return pipe(**kw).images[0]
    finally:
        attnproc.remove(pipe)


def test_job_file_renders_concepts_with_beta(files, tmp_path):
    from attnproc.workflows.manifest import read_records
    from attnproc.workflows.render import render

    pipe, concept, covariance = files
    job = {"pipeline": "tiny:sd15", "defaults": {"steps": 2, "height": 64, "width": 64, "seed": 0},
           "jobs": [{"prompt": "a <flag>", "method": "keylock",
                     "options": {"concepts": [{"file": concept, "beta": beta}], "covariance": covariance}}
                    for beta in (0.6, 0.9)]}  # two keylock jobs: the second is not refused (the token went again)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    summary = render(path, tmp_path / "out", progress=False)
    assert summary["done"] == 2 and not summary.get("failed")
    records = sorted((r for r in read_records(tmp_path / "out") if r.get("status") == "done"), key=lambda r: r["job"])
    assert [r["job"] for r in records] == [0, 1]
    got = [np.asarray(Image.open(tmp_path / "out" / r["output"]).convert("RGB"), dtype=np.float64) for r in records]
    want = [np.round(_library_image(pipe, concept, covariance, beta) * 255) for beta in (0.6, 0.9)]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1  # the library's render of the same concept and β (uint8 rounding)
    assert np.abs(got[0] - want[1]).max() > 1  # β reached the edit


def test_ui_renderer_takes_concept_files_and_beta(files):
    pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'attnproc[ui]')")
    from attnproc.ui.app import Renderer

    _, concept, covariance = files
    renderer = Renderer()
    options = {"concepts": [{"file": concept, "beta": 0.6}], "covariance": covariance}
    res = renderer.generate("tiny:sd15", "keylock", "a <flag>", seed=0, steps=2, height=64, width=64,
                            compare=False, options=options, repeats=1)
    assert res["options"]["concepts"] == [{"file": concept, "beta": 0.6}]
    pipe = renderer.pipeline("tiny:sd15")
    assert "<flag>" not in pipe.tokenizer.get_vocab()  # removed after the render
    with pytest.raises(attnproc.OptionError, match=r"concepts\[0\].beta must be a number in \[0, 1.5\]"):
        renderer.generate("tiny:sd15", "keylock", "a <flag>", steps=1, compare=False, repeats=1,
                          options={"concepts": [{"file": concept, "beta": 9}], "covariance": covariance})


def test_preflight_leaves_the_pipeline_vocabulary_as_it_was(files):
    """The preflight check binds the method to a cached stand-in pipeline; a concept's token must not stay there
    (it did: a second keylock render of the same pipeline was refused as 'already in the vocabulary')."""
    from attnproc.workflows.preflight import check_method, pipeline_facts

    _, concept, covariance = files
    facts = pipeline_facts("tiny:sd15")
    n_vocab = len(facts.target.tokenizer)
    for _ in range(2):
        check_method(facts, "keylock", {"concepts": [concept], "covariance": covariance})
        assert len(facts.target.tokenizer) == n_vocab and "<flag>" not in facts.target.tokenizer.get_vocab()
