"""`tformer classify CKPT --text A [--file F]`: labels from a fine-tuned sequence classifier."""

from __future__ import annotations

import argparse
import json

from tformer.cli import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned encoder classifier (`tformer finetune --task classify`)",
        description="Print each text's most probable label and its probability from a sequence classifier: the "
                    "final/ checkpoint of `tformer finetune CKPT --task classify` (its labels and pooling, cls or "
                    "mean, are saved with it) or an HF BertForSequenceClassification directory. --json prints every "
                    "label's probability.",
    )
    p.add_argument("path", help="classifier checkpoint directory")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--file", help="a UTF-8 file of texts, one a line (blank lines skipped)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text at most (default: 128)")
    p.add_argument("--json", action="store_true", help='print [{"text", "label", "probs": {label: p}}] as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tformer.cli.embed import _texts
    from tformer.data.classify import encode_texts
    from tformer.inference.embed import pad_batch
    from tformer.tokenizer import Tokenizer
    from tformer.train.encoder_models import load_classifier

    texts = _texts(args)
    if args.max_len < 3:
        raise UserError(f"--max-len must be >= 3 (room for [CLS], [SEP] and text), got {args.max_len}")
    model, labels = load_classifier(args.path)
    tokenizer = Tokenizer.load(args.path)
    rows = encode_texts(texts, tokenizer, min(args.max_len, model.config.max_seq_len))
    tokens, mask = pad_batch(rows, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    with torch.no_grad():
        probs = torch.softmax(model(tokens, mask).float(), dim=-1)  # (N, n_labels)
    best = probs.argmax(-1).tolist()
    if args.json:
        print(json.dumps([{"text": t, "label": labels[b], "probs": dict(zip(labels, p))}
                          for t, b, p in zip(texts, best, probs.tolist())]))
        return 0
    for t, b, p in zip(texts, best, probs.tolist()):
        print(f"{labels[b]}\t{p[b]:.4f}\t{t}")
    return 0
