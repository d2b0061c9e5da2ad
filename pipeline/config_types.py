"""The YAML/CLI values of a config checked against the type annotations of the dataclass they fill.

YAML is loose where a config must not be: ``per_channel: "false"`` is a non-empty string (true in Python),
``resize: "32"`` iterates as the characters ``"3"`` and ``"2"``, ``batch_size: 2.5`` passes a ``>= 1`` check and then
fails every row, and ``classes: [1.5]`` is truncated to class 1. Every such value is refused here, with the key and
what it should be, before anything runs; values built in Python (``RunConfig(...)``) are not checked again.
"""
from __future__ import annotations

import os
import re
import types
import typing
from typing import Any, Union

import yaml


#: ``1e-2``: a number to YAML 1.2 and to Python, a string to PyYAML (YAML 1.1 wants ``1.0e-2``)
EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_types(cls, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with numbers such as ``1e-2`` read as floats where a field takes floats; raise TypeError for the
    first value that does not fit its field's annotation in ``cls``."""
    hints = typing.get_type_hints(cls)
    values = {key: _exponents(value, hints[key]) if key in hints else value for key, value in values.items()}
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            raise TypeError(f"{key} must be {_describe(hints[key])}, got {_shown(value, hints[key])}")
    return values


def exponent_numbers(value: Any) -> Any:
    """``value`` with strings such as ``'1e-2'`` read as the floats they spell, in lists and mappings too (for
    untyped values, such as a composite's parameters: ``epsilon=1e-2`` then names the same group, and the same
    store, as ``epsilon=0.01``)."""
    if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [exponent_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: exponent_numbers(item) for key, item in value.items()}
    return value


def _exponents(value, hint):
    """``value`` with ``'1e-2'`` as a float where ``hint`` takes a float there."""
    if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()) and _fits(float(value), hint):
        return float(value)
    if isinstance(value, list):
        alternatives = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
        for alternative in alternatives:
            if typing.get_origin(alternative) in (list, tuple):
                return [_exponents(item, typing.get_args(alternative)[0]) for item in value]
    return value


def paths_as_text(values):
    """``values`` with every ``os.PathLike`` (a ``pathlib.Path`` from Python callers) as its string, nested too:
    the config holds paths as text (URLs and local paths alike), and a Path is a path, not a wrong type."""
    if isinstance(values, os.PathLike):
        return os.fspath(values)
    if isinstance(values, dict):
        return {key: paths_as_text(value) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(paths_as_text(value) for value in values)
    return values


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):  # list[X] or tuple[X, ...]: YAML gives lists for both
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(item, args[1]) for item in value.values())
    return True  # a type this module does not know (e.g. a nested dataclass, built by the caller)


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg, plural) for arg in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0], plural=True)}"
    if origin is dict:
        return "mappings" if plural else "a mapping"
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), type(None): ("unset", "unset")}
    return names[hint][plural] if hint in names else getattr(hint, "__name__", str(hint))


def _shown(value, hint) -> str:
    """The value and its type, and the likely slip when it is a quoted YAML value of the right type."""
    if isinstance(value, str):
        try:
            unquoted = yaml.safe_load(value)
        except yaml.YAMLError:
            unquoted = value
        if not isinstance(unquoted, str) and _fits(unquoted, hint):
            return f"the string {value!r} (in YAML, drop the quotes)"
        return f"the string {value!r}"
    return f"{value!r} ({type(value).__name__})"
