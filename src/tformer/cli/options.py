"""Typed CLI options generated from config dataclasses, so `--help` always lists every field.

A field `n_kv_heads` added with prefix "model." is the option `--model.n-kv-heads` (the parser
takes `--model.n_kv_heads` too: `tformer.cli.Parser`), stored under the field's path
`model.n_kv_heads`. Defaults are suppressed: only flags given on the command line reach the
namespace, so a config file's values are not overwritten by a default. The command parses the
strings (`none` or `null` for None; `--flag`/`--no-flag` for booleans); the config dataclass then
checks the result as it checks a file's values.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from tformer.fields import describe_type, split_optional

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def option_name(path: str) -> str:
    """The option of a field path: `model.n_kv_heads` -> `--model.n-kv-heads`."""
    return "--" + path.replace("_", "-")


def add_dataclass_options(container, cls, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[argparse.Action]:
    """One option per scalar field of `cls` but `exclude` (sub-config and dict fields are left to the caller).

    Each action gets `.field` (the field's path), for help texts filled in later (`set_help`).
    """
    hints = get_type_hints(cls)
    actions = []
    for f in dataclasses.fields(cls):
        base, _ = split_optional(hints[f.name])
        if dataclasses.is_dataclass(base) or base is dict or f.name in exclude:
            continue
        path = prefix + f.name
        kwargs: dict[str, Any] = dict(dest=path, default=argparse.SUPPRESS)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            item = get_args(base)[0]
            kwargs.update(action="append", type=_converter(item), metavar=_METAVARS[item])
        else:
            kwargs.update(type=_converter(hints[f.name]), metavar=_metavar(base))
        action = container.add_argument(option_name(path), **kwargs)
        action.field = path
        actions.append(action)
    return actions


def set_help(action: argparse.Action, text: str, default: str) -> None:
    """`action`'s help: `text` then its default, once."""
    repeatable = "; repeatable" if isinstance(action, argparse._AppendAction) else ""
    action.help = f"{text} (default: {default}{repeatable})" if text else f"default: {default}{repeatable}"


def format_default(value: Any) -> str:
    """A default as a command line would spell it: none, true, 1e-05, a b c."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    if value == "":
        return "''"
    return str(value)


def given_options(args: argparse.Namespace, prefix: str = "") -> dict:
    """Flags given on the command line, as a (nested for dotted names) dict."""
    out: dict = {}
    for key, value in vars(args).items():
        if not key.startswith(prefix) or key in ("func", "command", "config"):
            continue
        parts = key[len(prefix):].split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _metavar(base) -> str:
    if get_origin(base) is Literal:
        return "{" + ",".join(get_args(base)) + "}"
    return _METAVARS[base]


def _converter(hint):
    """str -> the field's value; an error names the expected type (argparse adds the option)."""
    base, optional = split_optional(hint)

    def convert(s: str):
        if optional and s.lower() in ("none", "null"):
            return None
        try:
            if get_origin(base) is Literal:
                if s not in get_args(base):
                    raise ValueError
                return s
            return base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {describe_type(hint)}, got {s!r}") from None

    return convert
