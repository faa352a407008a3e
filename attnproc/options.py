"""Method options: declared once on a config dataclass, validated, and described for UIs.

A method's ``Config`` is a dataclass whose fields are made with :func:`option`. The declaration is the single
source of truth for defaults, valid ranges and help text: ``attnproc.methods()``, the CLI, the gradio UI and the
ComfyUI export all read it, and :func:`build_config` enforces it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import AttnprocError


class OptionError(AttnprocError, ValueError):
    """An option name or value a method does not accept."""


@dataclass(frozen=True)
class OptionInfo:
    """What one option accepts, for humans and widget generators."""

    name: str
    type: str  # "int" | "float" | "bool" | "str" | "any"
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""

    def describe_range(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type == "bool":
            return "True or False"
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else _fmt(self.low)
            hi = "inf" if self.high is None else _fmt(self.high)
            return f"{self.type} in [{lo}, {hi}]"
        return self.type

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["choices"] is not None:
            d["choices"] = list(d["choices"])
        return d


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def option(default: Any, *, low: float | None = None, high: float | None = None,
           choices: Sequence | None = None, help: str = ""):
    """A config field with its valid range (``low``/``high`` inclusive) or ``choices`` and a one-line help."""
    meta = {"low": low, "high": high, "choices": tuple(choices) if choices is not None else None, "help": help}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str"}


def _type_name(annotation: Any) -> str:
    """``int``, ``float | None`` and the like map to their scalar type; anything else is "any"."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and len(args) == 1 and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    return _TYPE_NAMES.get(annotation, "any")


def option_infos(config_cls: type) -> list[OptionInfo]:
    """The options of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(config_cls)
    infos = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        infos.append(OptionInfo(
            name=f.name, type=_type_name(hints.get(f.name, Any)), default=default,
            low=f.metadata.get("low"), high=f.metadata.get("high"),
            choices=f.metadata.get("choices"), help=f.metadata.get("help", ""),
        ))
    return infos


def _coerce(info: OptionInfo, value: Any, method: str) -> Any:
    where = f"option {info.name!r} of method {method!r}"
    if value is None and info.default is None:  # None means "automatic" where it is the default
        return None
    if info.type == "bool":
        if isinstance(value, bool):
            return value
        raise OptionError(f"{where} must be True or False, got {value!r}")
    if info.type in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{where} must be a number ({info.describe_range()}), got {value!r}")
        if info.type == "int":
            if not float(value).is_integer():
                raise OptionError(f"{where} must be an integer ({info.describe_range()}), got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise OptionError(f"{where} must be finite ({info.describe_range()}), got {value!r}")
        if (info.low is not None and value < info.low) or (info.high is not None and value > info.high):
            raise OptionError(f"{where} is out of range: got {value!r}, valid: {info.describe_range()}")
        return value
    if info.type == "str" and not isinstance(value, str):
        raise OptionError(f"{where} must be a string ({info.describe_range()}), got {value!r}")
    if info.choices is not None and value not in info.choices:
        raise OptionError(f"{where} must be {info.describe_range()}, got {value!r}")
    return value


def build_config(config_cls: type, method: str, options: dict[str, Any]):
    """Validate ``options`` against ``config_cls`` and build it; errors name the option and its valid range."""
    infos = {i.name: i for i in option_infos(config_cls)}
    unknown = sorted(set(options) - set(infos))
    if unknown:
        valid = ", ".join(infos) or "(none)"
        raise OptionError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                          f"valid options: {valid}")
    values = {name: _coerce(infos[name], value, method) for name, value in options.items()}
    return check_config(config_cls(**values), method)


def check_config(config, method: str):
    """Run ``config.validate()`` (cross-option rules) if it has one; a ``ValueError`` becomes an
    :class:`OptionError` naming the method. Configs that validate when built call it from ``__post_init__``."""
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except OptionError:
            raise
        except ValueError as e:
            raise OptionError(f"method {method!r}: {e}") from None
    return config
