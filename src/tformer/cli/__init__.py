"""`tformer <command>`: one module per command group under `tformer.cli`.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returns an exit code or None).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# Command modules, in the order `tformer --help` lists them.
COMMANDS = ["params", "convert", "tokenizer", "data", "train", "finetune", "generate", "chat", "merge", "quantize",
            "serve", "attention", "lens", "inspect", "plot", "embed", "classify", "answer", "eval"]


class UserError(Exception):
    """Bad user input: printed as one line, exit code 2, no traceback."""


DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices of every command


def torch_dtype(name: str | None):
    """`--dtype` value -> torch dtype (None stays None)."""
    import torch

    return getattr(torch, name) if name else None


def check_destination(dst, overwrite: bool, *sources) -> None:
    """Refuse (UserError) a destination that is one of the sources, or that exists (a file or a
    non-empty directory) unless --overwrite was given."""
    from pathlib import Path

    dst = Path(dst)
    if any(Path(s).resolve() == dst.resolve() for s in sources):
        raise UserError(f"{dst} is also a source: write the output somewhere else")
    if (dst.is_file() or dst.is_dir() and any(dst.iterdir())) and not overwrite:
        raise UserError(f"{dst} exists: pass --overwrite to replace it, or choose another destination")


class Parser(argparse.ArgumentParser):
    """argparse, with `--a-b` and `--a_b` one option, and an unknown option refused by the
    (sub)command that met it: its usage, and the closest option it has.

    Subcommand parsers are of this class too (`add_subparsers` makes its parent's class).
    """

    def parse_known_args(self, args=None, namespace=None):
        self.argv = sys.argv[1:] if args is None else list(args)
        namespace, extras = super().parse_known_args(self._spelled(self.argv), namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return namespace, extras

    def _options(self) -> dict[str, str]:
        """Every long option, by its spelling with dashes."""
        return {_dashed(o): o for o in self._option_string_actions if o.startswith("--")}

    def _spelled(self, args: list[str]) -> list[str]:
        """`args` with each unknown long option that differs from one of ours only in - and _ renamed."""
        options, out = self._options(), []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            name, eq, value = arg.partition("=")
            if arg.startswith("--") and name not in self._option_string_actions and _dashed(name) in options:
                arg = options[_dashed(name)] + eq + value
            out.append(arg)
        return out

    def _suggestion(self, extras: list[str]) -> str:
        options = self._options()
        for arg in extras:
            if arg.startswith("--"):
                close = difflib.get_close_matches(_dashed(arg.partition("=")[0]), list(options), n=1)
                if close:
                    return f" (did you mean {options[close[0]]}?)"
        return ""


def _dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tformer",
        description="Train transformer language models, generate text and chat with them, serve them over an "
                    "OpenAI-compatible HTTP API; count a model's parameters, convert checkpoints to and from HF "
                    "and GGUF, merge LoRA adapters, train tokenizers, quantize weights.",
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
