"""`tformer lens CKPT --text ...`: the logit lens as a terminal table (and a PNG with --out)."""

from __future__ import annotations

import argparse

from tformer.cli.attention import load_text
from tformer.cli.decoding import add_model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lens",
        help="logit lens: each layer's top next-token predictions for a text",
        description=(
            "Project each layer's residual stream through the model's final norm and output head and print, for "
            "every position, each layer's top-k next tokens with their probabilities; the last layer's are the "
            "model's own. --out DIR also writes DIR/lens.png (layers x positions, coloured by the probability "
            "of the final prediction)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", help="tformer checkpoint or HF model directory (with tokenizer.json)")
    p.add_argument("--text", required=True, help="the text to look at")
    p.add_argument("--top-k", type=int, default=5, help="predictions per layer and position")
    p.add_argument("--out", help="directory for lens.png")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tformer.viz.lens import lens_table, logit_lens, plot_lens
    from tformer.viz.maps import token_labels

    model, tokenizer, ids = load_text(args)
    lens = logit_lens(model, ids, args.top_k)
    labels = token_labels(tokenizer, ids)
    print(lens_table(lens, tokenizer, labels))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(plot_lens(lens, tokenizer, labels, Path(args.out) / "lens.png"))
    return 0
