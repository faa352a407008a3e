import json

import pytest

import attnproc
from attnproc.options import OptionError
from attnproc.registry import REGISTRY, Registry


def test_methods_lists_builtins_and_options():
    infos = {m.name: m for m in attnproc.methods()}
    assert "dense" in infos and infos["dense"].summary
    knobs = {o.name: o for o in infos["knobs"].options}
    assert knobs["strength"].default == 0.5 and (knobs["strength"].low, knobs["strength"].high) == (0.0, 1.0)
    assert knobs["mode"].choices == ("a", "b")
    assert knobs["dense_first_steps"].type == "float"  # shared schedule options come with every sparse method
    json.dumps([m.to_dict() for m in attnproc.methods()])  # JSON-ready for UIs


def test_unknown_method_lists_valid_names():
    with pytest.raises(attnproc.UnknownMethodError) as e:
        REGISTRY.create("radail")
    assert "'radail'" in str(e.value) and "dense" in str(e.value) and "probe" in str(e.value)


@pytest.mark.parametrize("options, fragment", [
    ({"strength": 1.5}, "option 'strength' of method 'knobs' is out of range: got 1.5, valid: float in [0, 1]"),
    ({"strength": "high"}, "option 'strength' of method 'knobs' must be a number"),
    ({"mode": "c"}, "option 'mode' of method 'knobs' must be one of 'a', 'b'"),
    ({"width": 2.5}, "must be an integer"),
    ({"width": 4}, "width must be odd"),
    ({"dense_cross": 1}, "must be True or False"),
    ({"stength": 0.1}, "unknown option(s) 'stength' for method 'knobs'; valid options: dense_first_steps,"),
    ({"strength": float("nan")}, "must be finite"),
])
def test_bad_options_name_the_option_and_range(options, fragment):
    with pytest.raises(OptionError) as e:
        REGISTRY.create("knobs", **options)
    assert fragment in str(e.value)


def test_dense_takes_no_options():
    with pytest.raises(OptionError, match="valid options: \\(none\\)"):
        REGISTRY.create("dense", block_size=64)


def test_valid_options_are_coerced():
    m = REGISTRY.create("knobs", strength=1, width=5.0, dense_first_steps=0.25)
    assert m.config.strength == 1.0 and isinstance(m.config.strength, float)
    assert m.config.width == 5 and isinstance(m.config.width, int)


def test_register_rejects_bad_classes_and_name_clashes():
    reg = Registry()
    with pytest.raises(TypeError):
        reg.register(object)

    class NoSummary(attnproc.Method):
        name = "nosummary"
        summary = ""
    with pytest.raises(ValueError, match="summary"):
        reg.register(NoSummary)

    class Clash(attnproc.Method):
        name = "dense"
        summary = "another dense"
    with pytest.raises(ValueError, match="already registered"):
        REGISTRY.register(Clash)


def test_entry_point_methods_are_loaded(monkeypatch):
    class Plugin(attnproc.Method):
        name = "plugin"
        summary = "from a third-party package"

    class EP:
        name, value = "plugin", "thirdparty.mod:Plugin"

        def load(self):
            return Plugin

    import attnproc.registry as registry_module
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [EP()] if group == "attnproc.methods" else [])
    reg = Registry()
    assert reg.names() == ["plugin"]
    assert isinstance(reg.create("plugin"), Plugin)


def test_entry_point_name_must_match(monkeypatch):
    class Plugin(attnproc.Method):
        name = "other"
        summary = "misnamed"

    class EP:
        name, value = "plugin", "thirdparty.mod:Plugin"

        def load(self):
            return Plugin

    import attnproc.registry as registry_module
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [EP()])
    with pytest.raises(ValueError, match="names must match"):
        Registry().names()


def test_optional_options_accept_none_and_typed_values():
    from dataclasses import dataclass

    from attnproc.options import build_config, option, option_infos

    @dataclass
    class Cfg:
        decay: float | None = option(None, low=0.0, high=1.0, help="None: the family's default")

    info = option_infos(Cfg)[0]
    assert info.type == "float" and info.default is None
    assert build_config(Cfg, "m", {"decay": None}).decay is None
    assert build_config(Cfg, "m", {"decay": 1}).decay == 1.0
    with pytest.raises(OptionError, match="out of range"):
        build_config(Cfg, "m", {"decay": 2})
