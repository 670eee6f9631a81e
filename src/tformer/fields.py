"""Typed fields of tformer's config dataclasses, checked in one place.

`check_value` checks one value against its field's annotation, whether it comes from Python,
JSON, TOML or the command line: no coercion from strings (`"false"`, `"1e-5"`, `"20"` are
refused; the CLI parses its strings first), ints widen to float, a dict becomes its sub-config;
unknown keys are refused with the closest field name. Errors are `ConfigError`s naming the
field, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what to do."""


def check_value(path: str, value: Any, hint: Any, partial: bool = False) -> Any:
    """`value` for the field annotated `hint` (named `path` in errors), checked: ints widen to
    float, a dict becomes its sub-config (with `partial`: stays a dict of checked fields)."""
    base, optional = split_optional(hint)
    if value is None and optional:
        return None
    if get_origin(base) is Literal:
        if isinstance(value, str) and value in get_args(base):
            return value
        raise ConfigError(f"{path}={value!r} is not supported; choose one of {list(get_args(base))}")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if isinstance(value, dict):
            checked = check_values(base, value, path + ".", partial)
            return checked if partial else base(**checked)
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif get_origin(base) is list and isinstance(value, list):
        (item,) = get_args(base)
        return [check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    elif base in (bool, str, dict) and isinstance(value, base):
        return value
    raise ConfigError(f"{path}: expected {describe_type(hint)}, got {value!r} ({type(value).__name__})")


def check_values(cls: type, data: dict, prefix: str = "", partial: bool = False) -> dict:
    """`data`, a dict of `cls`'s fields, with each value checked (`check_value`); unknown keys are
    refused with the closest field name."""
    hints = _field_hints(cls)
    for key in data:
        if key not in hints:
            raise ConfigError(_unknown_field(cls.__name__, prefix, key, list(hints)))
    return {k: check_value(prefix + k, v, hints[k], partial) for k, v in data.items()}


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalise, as `check_value` does) every field of the dataclass `obj` in place."""
    for name, hint in _field_hints(type(obj)).items():
        setattr(obj, name, check_value(prefix + name, getattr(obj, name), hint))


def describe_type(hint: Any) -> str:
    """How an error names the type a field expects: 'an integer', 'true or false', ..."""
    base, optional = split_optional(hint)
    if get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(c) for c in get_args(base))
    elif dataclasses.is_dataclass(base):
        text = f"a table of {base.__name__} fields"
    elif get_origin(base) is list:
        text = f"a list of {_NAMES[get_args(base)[0]]}s"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}[base]
    return text + " or null" if optional else text


_NAMES = {str: "string", int: "integer", float: "number"}


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of `X | None`, or (hint, False)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _unknown_field(kind: str, prefix: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"known fields: {', '.join(known)}"
    return f"unknown {kind} field {prefix + key!r}: {hint}"
