"""`tformer classify CKPT --text A [--file F]`: labels from a fine-tuned sequence classifier, or each
word's tag and the entities from a token classifier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tformer.cli import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned encoder classifier (`tformer finetune --task classify`)",
        description="Print each text's most probable label and its probability from a sequence classifier: the "
                    "final/ checkpoint of `tformer finetune CKPT --task classify` (its labels and pooling, cls or "
                    "mean, are saved with it) or an HF BertForSequenceClassification directory. --json prints every "
                    "label's probability. A token classifier (`--task token-classify`) tags each word (split at "
                    "whitespace) and lists the entities its BIO tags make.",
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
    from tformer.train.encoder_models import load_classifier, read_head_meta

    texts = _texts(args)
    if args.max_len < 3:
        raise UserError(f"--max-len must be >= 3 (room for [CLS], [SEP] and text), got {args.max_len}")
    if read_head_meta(args.path).get("head") == "TokenClassifier":
        return _tag(args, texts)
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


def _tag(args: argparse.Namespace, texts: list[str]) -> int:
    """A token classifier: each text's words (split at whitespace) with their tags, and its entities."""
    import torch

    from tformer.data.tagging import encode_tagged, entities
    from tformer.tokenizer import Tokenizer
    from tformer.train.encoder_models import load_saved

    model, meta = load_saved(Path(args.path))
    labels = meta.get("id2label") or [str(i) for i in range(model.classifier.out_features)]
    tokenizer = Tokenizer.load(args.path)
    sentences = [(t.split(), ["O"] * len(t.split())) for t in texts]
    rows, _, firsts = encode_tagged(tokenizer, sentences, {"O": 0}, min(args.max_len, model.config.max_seq_len))
    out = []
    for (words, _), row, first in zip(sentences, rows, firsts):
        with torch.no_grad():
            tags = [labels[i] for i in model(torch.tensor([row])).argmax(-1)[0, first].tolist()]
        found = sorted(entities(tags), key=lambda e: e[1])
        out.append({"words": words[: len(tags)], "tags": tags,
                    "entities": [{"type": k, "text": " ".join(words[a: b + 1]), "start": a, "end": b + 1}
                                 for k, a, b in found]})
    if args.json:
        print(json.dumps(out))
        return 0
    for r in out:
        print(" ".join(f"{w}/{t}" for w, t in zip(r["words"], r["tags"])))
        for e in r["entities"]:
            print(f"  {e['type']}\t{e['text']}")
    return 0
