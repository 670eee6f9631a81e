"""`tformer merge CKPT ADAPTER OUT`: a base checkpoint and a LoRA adapter as one plain checkpoint."""

from __future__ import annotations

import argparse

from tformer.cli import DTYPES, check_destination, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base checkpoint",
        description=(
            "Fold a LoRA or QLoRA adapter (tformer.adapters.save_adapter) into the weights of the checkpoint it "
            "was trained on and write the result as a plain tformer checkpoint with the base's tokenizer and chat "
            "template, which generate, chat and convert read like any other. An adapter trained on another base "
            "is refused. Prints the largest weight change and the largest logit difference between the merged "
            "model and the adapted one on a fixed probe of token ids."
        ),
    )
    p.add_argument("checkpoint", metavar="CKPT", help="the base: a tformer checkpoint or HF model directory")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("out", metavar="OUT", help="directory to write (an existing one needs --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the merged weights (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.adapters import merge_checkpoint

    check_destination(args.out, args.overwrite, args.checkpoint, args.adapter)
    report = merge_checkpoint(args.checkpoint, args.adapter, args.out, dtype=torch_dtype(args.dtype))
    quantized = f"; {len(report.dequantized)} NF4 layers dequantized (QLoRA)" if report.dequantized else ""
    print(f"merged {len(report.layers)} LoRA layers of {args.adapter} into {args.checkpoint}{quantized}")
    print(f"max weight change {report.max_weight_change:.3g}; max logit difference from the adapted model "
          f"{report.max_logit_diff:.3g} (on a probe of token ids)")
    print(f"wrote {args.out}")
    return 0
