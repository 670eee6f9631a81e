"""`tformer convert SRC DST --to tformer|hf|gguf`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli import DTYPES, UserError, check_destination, torch_dtype

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def register(sub: argparse._SubParsersAction) -> None:
    from tformer.convert.gguf import FILE_TYPES

    p = sub.add_parser(
        "convert",
        help="convert between tformer checkpoints, HF model directories and GGUF files",
        description=(
            "Convert a model. SRC is a tformer checkpoint (tformer.json + model.safetensors), an HF model "
            "directory (config.json + *.safetensors; GPT2, Llama, Mistral, Qwen2; encoders: BERT, ModernBERT, "
            "--to hf BERT and ModernBERT) or a GGUF file (llama.cpp's; "
            "llama and qwen2 architectures, F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, read as float32 unless "
            "--dtype), or a sharded training checkpoint of `tformer train --parallel ddp|fsdp` (made whole). "
            "DST is a directory for --to tformer and --to hf, one file for --to gguf (2-D weights in "
            "--gguf-type; llama and qwen2-shaped models). The tokenizer and chat template go along. DST is "
            "written atomically; an existing DST is refused unless --overwrite is given."
        ),
    )
    p.add_argument("src", help="source: checkpoint or HF directory, or .gguf file")
    p.add_argument("dst", help="destination directory, or .gguf file with --to gguf (an existing one needs "
                               "--overwrite)")
    p.add_argument("--to", choices=["tformer", "hf", "gguf"], required=True, help="format of DST")
    p.add_argument("--dtype", choices=DTYPES, help="cast weights (--to tformer or hf; default: keep, float32 "
                                                   "from GGUF)")
    p.add_argument("--gguf-type", choices=list(FILE_TYPES), default=None,
                   help="--to gguf: type of the 2-D weights (default: f16; norms stay f32)")
    p.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                   help="--to hf: split weights into shards of at most this many GB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if args.to == "gguf" and args.dtype:
        raise UserError("--dtype does not apply to --to gguf: choose the file's weight type with --gguf-type")
    if args.to != "gguf" and args.gguf_type:
        raise UserError(f"--gguf-type applies to --to gguf only (this is --to {args.to})")
    if args.to == "gguf" and dst.is_dir():
        raise UserError(f"{dst} is a directory, but --to gguf writes one file: name it, e.g. {dst / 'model.gguf'}")
    check_destination(dst, args.overwrite, src)
    model, tokenizer, template, labels = _read(src, torch_dtype(args.dtype))
    _write(args, model, tokenizer, template, dst, labels)
    n = sum(p.numel() for p in model.parameters())
    kind = f"gguf, {args.gguf_type or 'f16'}" if args.to == "gguf" else args.to
    print(f"wrote {dst} ({kind}, {n:,} parameters)")
    return 0


def _read(src: Path, dtype):
    """(model, tokenizer or None, chat template or None, a classifier's labels or None) of a GGUF file
    or a model directory; an encoder comes with its task head (classifier, tagger, QA, masked LM)."""
    from tformer.checkpoint import load
    from tformer.convert.gguf import load_gguf, read_chat_template
    from tformer.sources import resolve_config
    from tformer.train.encoder_models import load_saved
    from tformer.io import CheckpointError
    from tformer.tokenizer import TOKENIZER_FILE, Tokenizer

    what = "SRC is a .gguf file, a tformer checkpoint directory or an HF model directory"
    if not src.exists():
        raise UserError(f"{src} does not exist: {what}")
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UserError(f"{src} is not a GGUF file (it does not start with GGUF's magic bytes): {what}")
        try:
            return (*load_gguf(src, dtype=dtype), None)
        except CheckpointError:  # names what tformer cannot read (an architecture, a tensor type)
            raise
        except (ValueError, OSError, EOFError, IndexError, KeyError, TypeError) as e:  # a damaged file
            raise UserError(f"{src} is not a readable GGUF file ({type(e).__name__}: {e}); is it complete?") from None
    from tformer.train.sharded import consolidate, is_sharded

    if is_sharded(src):  # a sharded training checkpoint (tformer train --parallel ddp|fsdp): made whole
        model, tokenizer, template = consolidate(src)
        return (model.to(dtype) if dtype else model), tokenizer, template, None
    tokenizer = Tokenizer.load(src) if (src / TOKENIZER_FILE).is_file() else None
    if resolve_config(str(src))[0].architecture == "encoder":  # with the head its weights hold
        model, meta = load_saved(src)
        return (model.to(dtype) if dtype else model), tokenizer, None, meta.get("id2label")
    return load(src, dtype=dtype), tokenizer, read_chat_template(src), None


def _write(args: argparse.Namespace, model, tokenizer, template: str | None, dst: Path,
           labels: list[str] | None = None) -> None:
    from tformer.checkpoint import save
    from tformer.convert.gguf import save_gguf, write_chat_template
    from tformer.convert.hf import save_hf
    from tformer.train.encoder_models import HEADS, save_with_head

    if args.to == "gguf":
        if tokenizer is None:
            raise UserError(f"{args.src} has no tokenizer.json, which a GGUF file carries: save the checkpoint "
                            "with its tokenizer first")
        save_gguf(model, dst, tokenizer, template, args.gguf_type or "f16")
    elif args.to == "hf":
        max_bytes = int(args.max_shard_size * 1e9) if args.max_shard_size else None
        save_hf(model, dst, tokenizer=tokenizer, max_shard_bytes=max_bytes, labels=labels)
        if tokenizer is not None:
            write_chat_template(dst, template)
    elif type(model).__name__ in HEADS:  # an encoder (with a task head): the head and labels recorded
        save_with_head(model, dst, tokenizer, labels)
    else:
        save(model, dst, tokenizer=tokenizer, write_extra=lambda folder: write_chat_template(folder, template))
