"""The steering nodes' specs in the exported pack (no ComfyUI needed): sockets, and widget defaults equal to the
library's. Their behaviour in the real engine: test_comfy_steer.py."""
import json

import pytest

import attnproc
from attnproc.workflows.comfy import example_api, node_specs
from attnproc.workflows.comfy_steer import run_node

# widgets that are text boxes for what the library takes as lists, paths or None (empty = the library's default)
TEXT = {"prompt", "phrases", "references", "scene", "subjects", "concepts", "covariance", "beta", "tau"}


@pytest.mark.parametrize("method,node,sockets", [
    ("structured", "AttnProcStructured", ["model", "clip"]),
    ("isolate", "AttnProcIsolate", ["model", "clip"]),
    ("keylock", "AttnProcKeylock", ["model"]),
])
def test_steering_node_widgets_carry_the_library_defaults(method, node, sockets):
    spec = next(s for s in node_specs([method]) if s["node_id"] == node)
    assert [s["name"] for s in spec["sockets"]] == sockets and spec["output"] == "MODEL"
    options = {o.name: o for o in next(m for m in attnproc.methods() if m.name == method).options}
    widgets = {w["name"]: w for w in spec["widgets"]}
    for name, w in widgets.items():
        if name in TEXT:
            assert w["kind"] == "STRING" and w["default"] == "", name
            continue
        default = options[name].default
        assert w["default"] == (str(default) if w["kind"] == "COMBO" else default), name
    # every library option is a widget, except those the node fills itself
    filled = {"structured": set(), "isolate": {"prompts"}, "keylock": {"lock_keys"}}[method]
    assert set(options) - set(widgets) == filled


def test_keylock_comes_with_the_concept_clip_and_encode_nodes():
    specs = node_specs(["keylock"])
    clip = next(s for s in specs if s["node_id"] == "AttnProcConceptClip")
    assert clip["output"] == "CLIP" and [s["type"] for s in clip["sockets"]] == ["CLIP"]
    encode = next(s for s in specs if s["node_id"] == "AttnProcConceptEncode")
    assert encode["output"] == "CONDITIONING" and [s["type"] for s in encode["sockets"]] == ["CLIP"]
    assert [w["name"] for w in encode["widgets"]] == ["concepts", "text"]
    api = example_api(next(s for s in specs if s["node_id"] == "AttnProcKeylock"))
    # the positive prompt comes from the concept encode node (the checkpoint's CLIP, the node's concept files),
    # names the token as a ComfyUI embedding, and the keylock node locks globally on its superclass encoding
    assert api["3"]["class_type"] == "AttnProcConceptEncode" and api["3"]["inputs"]["clip"] == ["1", 1]
    assert "embedding:my_concept" in api["3"]["inputs"]["text"]
    assert api["3"]["inputs"]["concepts"] == api["2"]["inputs"]["concepts"] and api["2"]["inputs"]["locking"] == "global"
    # the negative through the same node, so cond and uncond (both carrying a superclass encoding) batch together
    assert api["4"]["class_type"] == "AttnProcConceptEncode" and api["4"]["inputs"]["text"] == "blurry, low quality"
    assert api["4"]["inputs"]["concepts"] == api["2"]["inputs"]["concepts"]


def test_isolate_example_batch_is_references_then_scene():
    api = example_api(next(s for s in node_specs(["isolate"])))
    node = api["2"]["inputs"]
    refs = node["references"].splitlines()
    assert api["5"]["inputs"]["batch_size"] == len(refs) + 1 == len(json.loads(node["subjects"])) + 1
    assert api["3"]["inputs"]["text"] == node["scene"]


def test_unknown_steering_node_is_refused():
    with pytest.raises(ValueError, match="unknown attnproc steering node 'AttnProcNope'"):
        run_node("AttnProcNope", {})
