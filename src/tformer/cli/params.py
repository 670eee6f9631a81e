"""`tformer params NAME_OR_PATH`: parameter counts by component, without allocating weights."""

from __future__ import annotations

import argparse
import json

from tformer.cli import UserError
from tformer.sources import resolve_config

EPILOG = """\
examples:
  tformer params llama-3-8b             a preset (see --list)
  tformer params out/my-run             a tformer checkpoint directory (tformer.json)
  tformer params ~/models/Qwen2.5-0.5B  an HF model directory (config.json)
  tformer params my-config.json         a JSON file of ModelConfig fields
  tformer params gpt2 --json            machine-readable: {"embeddings": ..., "total": ...}

The model is built on the meta device: no weights are allocated or read, so any size is instant.
Tied output weights are the token embedding and count once (output = 0)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="count a model's parameters by component",
        description="Count the parameters of a preset, checkpoint or config by component "
        "(embeddings, attention, ffn, norms, output) with their share of the total.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="NAME_OR_PATH",
                   help="preset name, tformer checkpoint dir, HF model dir, or ModelConfig JSON file")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.add_argument("--list", action="store_true", help="list the preset names and their sources, then exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.params import format_breakdown, parameter_breakdown

    if args.list:
        _print_presets()
        return 0
    if not args.model:
        raise UserError("give a preset name or a path (`tformer params --list` lists the presets)")
    config, source = resolve_config(args.model)
    breakdown = parameter_breakdown(config)
    if args.json:
        print(json.dumps(breakdown))
        return 0
    tied = "; output tied to the token embedding" if config.tie_embeddings else ""
    print(format_breakdown(breakdown, title=f"{args.model} ({source}{tied})"))
    return 0


def _print_presets() -> None:
    from tformer.presets import list_presets, preset_source

    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_source(name)}")
