"""`tformer <command>`: one module per command group under `tformer.cli`.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returns an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order `tformer --help` lists them.
COMMANDS = ["params", "convert", "tokenizer", "train", "generate", "quantize"]


class UserError(Exception):
    """Bad user input: printed as one line, exit code 2, no traceback."""


DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices of every command


def torch_dtype(name: str | None):
    """`--dtype` value -> torch dtype (None stays None)."""
    import torch

    return getattr(torch, name) if name else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tformer",
        description="Train transformer language models and generate text with them; count a model's "
                    "parameters, convert checkpoints to and from HF, train tokenizers, quantize weights.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"tformer.cli.{name}").register(sub)
    return parser


def _version() -> str:
    """tformer's version as installed (package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tformer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except (UserError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tformer {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
