"""Typed CLI options generated from dataclasses, so `--help` always lists every field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _base_type(hint) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


def _converter(hint):
    base, optional = _base_type(hint)
    if get_origin(base) is Literal:
        choices = get_args(base)

        def conv(s: str):
            if s not in choices:
                raise argparse.ArgumentTypeError(f"{s!r} is not one of {list(choices)}")
            return s
    elif base is bool:
        def conv(s: str):
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (true/false)")
    else:
        conv = base
    if not optional:
        return conv
    return lambda s: None if s.lower() == "none" else conv(s)


def add_dataclass_options(parser, cls, prefix: str = "", help_text: dict | None = None) -> None:
    """One `--[prefix]name` option per field (nested dataclasses as `--prefix.sub.name`).

    Defaults are suppressed: only flags given on the command line appear in the namespace.
    """
    help_text = help_text or {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        flag = f"--{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            add_dataclass_options(parser, hint, f"{prefix}{f.name}.", help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = help_text.get(f.name, "")
        text = f"{text} (default: {default!r})" if text else f"default: {default!r}"
        base, _ = _base_type(hint)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif get_origin(base) is list:
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=text + " (repeatable)")
        elif get_origin(base) is dict or base is dict:
            continue  # filled through the nested options of its own dataclass
        else:
            parser.add_argument(flag, type=_converter(hint), default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=text)


def given_options(args: argparse.Namespace, prefix: str = "") -> dict:
    """Flags given on the command line, as a (nested for dotted names) dict."""
    out: dict = {}
    for key, value in vars(args).items():
        if not key.startswith(prefix) or key in ("func", "command"):
            continue
        parts = key[len(prefix):].split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
