"""Registry: method name -> Method class (its Config validates options).

Built-in methods register with ``@register``; third-party packages declare an entry point in the group
``attnproc.methods`` (``name = "package.module:MethodClass"``), loaded the first time a name is looked up.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import AttnprocError
from .options import OptionError, OptionInfo, build_config, option_infos

ENTRY_POINT_GROUP = "attnproc.methods"
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class UnknownMethodError(AttnprocError, KeyError, ValueError):
    """A method name that no one registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    options: tuple[OptionInfo, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "options": [o.to_dict() for o in self.options]}


class Registry:
    def __init__(self):
        self._methods: dict[str, type] = {}
        self._entry_points_loaded = False

    def register(self, cls: type) -> type:
        from .method import Method

        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register() takes a subclass of attnproc.Method, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{cls.__name__}.name must be a lowercase identifier, got {name!r}")
        if not getattr(cls, "summary", ""):
            raise ValueError(f"{cls.__name__} needs a one-line `summary`")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        existing = self._methods.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__name__}")
        self._methods[name] = cls
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._methods:
                continue
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ValueError(f"entry point {ep.name!r} ({ep.value}) loads a method named "
                                 f"{getattr(cls, 'name', None)!r}; the names must match")
            self.register(cls)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._methods)

    def get(self, name: str) -> type:
        self._load_entry_points()
        if not isinstance(name, str) or name not in self._methods:
            raise UnknownMethodError(f"unknown attention method {name!r}; registered methods: "
                                     f"{', '.join(self.names())}")
        return self._methods[name]

    def create(self, name: str, **options: Any):
        """A validated method instance."""
        cls = self.get(name)
        return cls(build_config(cls.Config, name, options))

    def create_many(self, names: list[str] | tuple[str, ...], options: dict[str, Any]):
        """A composition: the first method is the base (dense or sparse), the rest are edits applied around it.
        ``options`` maps each method name to its options dict."""
        from .method import Composed, Edit

        names = list(names)
        if not names:
            raise ValueError("an empty list of methods; give at least one method name")
        if len(set(names)) != len(names):
            raise ValueError(f"a method appears twice in {names}")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise OptionError(f"options given for {', '.join(map(repr, unknown))}, which is not in the composition "
                              f"{names}; pass options per method: name={{...}}")
        for n in names:
            if not isinstance(options.get(n, {}), dict):
                raise OptionError(f"options for {n!r} in a composition must be a dict, got {options[n]!r}")
        built = [self.create(n, **options.get(n, {})) for n in names]
        base, edits = built[0], built[1:]
        if isinstance(base, Edit) and edits:
            raise ValueError(f"{names[0]!r} is an edit; put the base method (dense or a sparse method) first")
        if base.computes_output and edits:
            raise ValueError(f"{names[0]!r} computes whole attention calls itself (it merges tokens before the "
                             f"projections), so edits cannot be composed around it (got {names})")
        for n, e in zip(names[1:], edits):
            if not isinstance(e, Edit):
                raise ValueError(f"{n!r} is not an edit; only one base method can be composed (got {names})")
        return Composed(base, edits) if edits else base

    def infos(self) -> list[MethodInfo]:
        return [MethodInfo(n, self._methods[n].summary, tuple(option_infos(self._methods[n].Config)))
                for n in self.names()]


REGISTRY = Registry()
register = REGISTRY.register


def methods() -> list[MethodInfo]:
    """The registered methods: name, one-line summary, and options with defaults and valid ranges."""
    return REGISTRY.infos()
