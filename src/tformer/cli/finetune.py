"""`tformer finetune CKPT --data FILE.jsonl`: `tformer train` from a checkpoint, with fine-tuning defaults."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tformer.cli import UserError
from tformer.train.config import TrainConfig

# LoRA's usual recipe (PEFT/TRL examples): lr 2e-4 decaying to a tenth, short warmup, no weight decay
DEFAULTS = TrainConfig(
    method="lora", lr=2e-4, min_lr=2e-5, warmup=10, max_steps=200, weight_decay=0.0, batch_size=8, seq_len=512,
    eval_every=50, out_dir="runs/finetune", sample_tokens=0,
)
FULL_LR = 2e-5  # --method full without --lr: all weights move, so a tenth of LoRA's rate


def register(sub: argparse._SubParsersAction) -> None:
    from tformer.cli.train import add_train_options

    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on chat, completion or preference JSONL (SFT or DPO; LoRA, QLoRA or full)",
        usage="%(prog)s CKPT --data FILE.jsonl [--method lora|qlora|full] [--OPTION VALUE ...]",
        description=(
            "Fine-tune CKPT (a tformer checkpoint, e.g. one converted from GGUF or HF) on JSONL examples: "
            '{"messages": [{"role", "content"}, ...]} (chat: the loss on assistant turns, rendered with the '
            'checkpoint\'s chat template), {"prompt", "completion"} (the loss on the completion), or '
            '{"prompt", "chosen", "rejected"} (DPO against the starting weights). The same as `tformer train '
            "--preset CKPT` with fine-tuning defaults: LoRA (--method lora; qlora puts the base in NF4, full trains "
            f"every weight at lr {FULL_LR:g} unless --lr is given), lr 2e-4, {DEFAULTS.max_steps} steps, --seq-len up "
            "to 512 (the model's context if shorter), packing, no sample at the end. Checkpoints go to --out-dir "
            "(adapters alone with LoRA); `tformer data inspect FILE --ckpt CKPT` shows what carries the loss."
        ),
        add_help=False,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to fine-tune")
    add_train_options(p, DEFAULTS, hidden=("preset",))
    p.set_defaults(func=run)


def make_finetune_config(args: argparse.Namespace) -> TrainConfig:
    """DEFAULTS with CKPT as the preset, then --config and the flags; --seq-len, when not given, is
    capped at the checkpoint's context and --lr follows --method."""
    from tformer.checkpoint import is_tformer_checkpoint
    from tformer.cli.train import make_config
    from tformer.sources import resolve_config

    given = vars(args)
    checkpoint = given.pop("checkpoint")
    if not Path(checkpoint).is_dir() or not is_tformer_checkpoint(checkpoint):
        raise UserError(f"{checkpoint} is not a tformer checkpoint: convert a GGUF file or HF directory first with "
                        "`tformer convert SRC OUT --to tformer`")
    given["preset"] = checkpoint
    cfg = make_config(args)
    changes = {}
    if "seq_len" not in given:
        changes["seq_len"] = min(cfg.seq_len, resolve_config(checkpoint)[0].max_seq_len)
    if "lr" not in given and cfg.method == "full":
        changes.update(lr=FULL_LR, min_lr=FULL_LR / 10)
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from tformer.cli.train import run_training

    cfg = make_finetune_config(args)
    if not cfg.data:
        raise UserError("pass the examples to fine-tune on: --data FILE.jsonl")
    code = run_training(cfg)
    if code == 0:
        best = Path(cfg.out_dir) / "best"
        target = f"{cfg.preset} --adapter {best}" if cfg.method != "full" else str(best)
        print(f"chat with the result: tformer chat {target}")
    return code
