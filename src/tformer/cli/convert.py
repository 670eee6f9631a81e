"""`tformer convert SRC DST --to tformer|hf`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli import DTYPES, UserError, torch_dtype


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between tformer checkpoints and HF model directories",
        description=(
            "Convert a model directory. SRC is a tformer checkpoint (tformer.json + model.safetensors) or an "
            "HF model directory (config.json + *.safetensors; GPT2, Llama, Mistral, Qwen2). DST is written "
            "atomically; its tokenizer.json is copied along when SRC has one. An existing DST is refused "
            "unless --overwrite is given."
        ),
    )
    p.add_argument("src", help="source directory")
    p.add_argument("dst", help="destination directory (created; an existing one needs --overwrite)")
    p.add_argument("--to", choices=["tformer", "hf"], required=True, help="format of DST")
    p.add_argument("--dtype", choices=DTYPES, help="cast weights (default: keep)")
    p.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                   help="--to hf: split weights into shards of at most this many GB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.checkpoint import load, save
    from tformer.convert.hf import save_hf

    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise UserError("SRC and DST are the same directory: write the conversion somewhere else")
    if (dst.is_file() or dst.is_dir() and any(dst.iterdir())) and not args.overwrite:
        raise UserError(f"{dst} exists: pass --overwrite to replace it, or choose another DST")
    dtype = torch_dtype(args.dtype)
    model = load(src, dtype=dtype)
    tokenizer = None
    if (src / "tokenizer.json").is_file():
        from tformer.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(src / "tokenizer.json")
    if args.to == "hf":
        max_bytes = int(args.max_shard_size * 1e9) if args.max_shard_size else None
        save_hf(model, dst, tokenizer=tokenizer, max_shard_bytes=max_bytes)
    else:
        save(model, dst, tokenizer=tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({args.to}, {n:,} parameters)")
    return 0
