"""`tformer quantize CKPT --mode int8|int4 [--group-size 64] [--out DIR] [--eval]`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tformer.cli import DTYPES, UserError, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's Linear weights to int8 or int4",
        description=(
            "Weight-only quantization. CKPT is a tformer checkpoint or an HF model directory; --out is written "
            "as a tformer checkpoint (tformer.json records the quantization; tokenizer.json is copied) that "
            "`tformer generate` and tformer.load read. Tied output heads stay in full precision. --eval "
            "reports held-out perplexity and bits per character of the original and the quantized model on "
            "the validation split of the default corpus, tokenised with CKPT's tokenizer.json (the evaluation "
            "training runs)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ckpt", help="checkpoint or HF model directory")
    p.add_argument("--mode", choices=["int8", "int4"], required=True)
    p.add_argument("--group-size", type=int, default=64, help="int4: input channels per scale (32/64/128/256)")
    p.add_argument("--skip", action="append", default=None, metavar="NAME",
                   help="layer name or suffix (e.g. ffn.w2) to keep in full precision; repeatable "
                        "(default: none; an untied output head becomes int8 in both modes, a tied one stays as it is)")
    p.add_argument("--out", help="output checkpoint directory (created)")
    p.add_argument("--dtype", choices=DTYPES, help="cast weights before quantizing (default: keep)")
    p.add_argument("--eval", action="store_true",
                   help="report validation perplexity and bits per character before and after")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="evaluation window (capped at max_seq_len)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.checkpoint import load, save
    from tformer.quantize import is_quantized, quantize_model
    from tformer.train.loop import resolve_device

    ckpt = Path(args.ckpt)
    if not args.out and not args.eval:
        raise UserError("nothing to do: pass --out DIR to write the quantized model, and/or --eval")
    if args.out and Path(args.out).resolve() == ckpt.resolve():
        raise UserError("--out is CKPT itself: write the quantized model somewhere else")
    device = resolve_device(args.device)
    model = load(ckpt, device=device, dtype=torch_dtype(args.dtype)).eval()
    if is_quantized(model):
        raise UserError(f"{ckpt} is already quantized: quantize the full-precision checkpoint")
    evaluate = _evaluator(args, ckpt, model.config.max_seq_len, device) if args.eval else None
    before = evaluate(model) if evaluate else None
    quantize_model(model, args.mode, args.group_size, skip=args.skip or ())
    what = args.mode + (f", group size {args.group_size}" if args.mode == "int4" else "")
    if args.out:
        def copy_tokenizer(tmp: Path) -> None:  # into the checkpoint before it goes into place
            if (ckpt / "tokenizer.json").is_file():
                shutil.copyfile(ckpt / "tokenizer.json", tmp / "tokenizer.json")

        save(model, args.out, write_extra=copy_tokenizer)
        size = (Path(args.out) / "model.safetensors").stat().st_size
        print(f"wrote {args.out} ({what}; model.safetensors {size / 2**20:.2f} MiB)")
    if evaluate:
        after = evaluate(model)
        ppl0, ppl1 = before["val_ppl"], after["val_ppl"]
        print(f"validation perplexity ({before['val_tokens']:,} tokens): original {ppl0:.4f}, {what} {ppl1:.4f} "
              f"({100 * (ppl1 / ppl0 - 1):+.2f}%)")
        print(f"validation bits per character: original {before['val_bpc']:.4f}, {what} {after['val_bpc']:.4f}")
    return 0


def _evaluator(args, ckpt: Path, max_seq_len: int, device):
    """model -> `tformer.train.evaluate.evaluate` metrics on the validation split of the default
    corpus, tokenised with the checkpoint's tokenizer."""
    from tformer.data import build_shards, load_corpus
    from tformer.tokenizer import Tokenizer
    from tformer.train.evaluate import evaluate

    if not (ckpt / "tokenizer.json").is_file():
        raise UserError(f"--eval needs the model's tokenizer: {ckpt / 'tokenizer.json'} not found")
    if args.eval_batches < 0 or args.batch_size <= 0 or args.seq_len <= 0:
        raise UserError("--eval-batches must be >= 0, --batch-size and --seq-len > 0")
    val = build_shards(load_corpus(None), Tokenizer.load(ckpt / "tokenizer.json")).val
    seq_len = min(args.seq_len, max_seq_len)
    return lambda model: evaluate(model, val, args.batch_size, seq_len, max_batches=args.eval_batches or None,
                                  device=device)
