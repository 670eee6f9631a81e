"""`tformer attention CKPT --text ... --out DIR`: attention maps (PNG) and the interactive explorer (HTML)."""

from __future__ import annotations

import argparse

from tformer.cli import UserError
from tformer.cli.decoding import add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="attention maps of a text: PNG heatmaps and an interactive HTML explorer",
        description=(
            "Run a text through a decoder checkpoint and write its exact attention weights (the reference formula, "
            "whatever kernels the model would use) for every layer and head: three PNGs for --layer/--head (the "
            "head, the layer's head grid, the mean over heads) and DIR/attention.html, a self-contained page "
            "(no network) with every layer and head, attention rollout and the logit lens."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", help="tformer checkpoint or HF model directory (with tokenizer.json)")
    p.add_argument("--text", required=True, help="the text to look at")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, default=0, help="layer of the PNGs (negative counts from the last)")
    p.add_argument("--head", type=int, default=0, help="head of the single-head PNG")
    p.add_argument("--top-k", type=int, default=5, help="logit-lens predictions per layer and position")
    add_model_options(p)
    p.set_defaults(func=run)


def load_text(args: argparse.Namespace):
    """(model, tokenizer, ids) for args.path and args.text, the text checked against the model's length."""
    from tformer.inference import load_tokenizer

    tokenizer = load_tokenizer(args.path)
    ids = tokenizer.encode(args.text)
    if not ids:
        raise UserError("--text has no tokens: pass some text")
    model = load_model(args)
    if not hasattr(model, "layers") or not hasattr(model, "hidden"):
        raise UserError(f"{args.path} is not a decoder-only model: attention maps and the lens read decoders")
    if len(ids) > model.config.max_seq_len:
        raise UserError(f"--text is {len(ids)} tokens, more than the model's max_seq_len "
                        f"{model.config.max_seq_len}: pass a shorter text")
    if getattr(args, "top_k", 1) <= 0:
        raise UserError("--top-k must be > 0")
    return model, tokenizer, ids


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tformer.viz.explorer import page_data, write_page
    from tformer.viz.lens import logit_lens
    from tformer.viz.maps import attention_weights, rollout, token_labels, write_pngs

    model, tokenizer, ids = load_text(args)
    weights = attention_weights(model, ids)  # (L, H, T, T)
    L, H = weights.shape[:2]
    if not -L <= args.layer < L:
        raise UserError(f"--layer {args.layer} is out of range: the model has {L} layers")
    if not 0 <= args.head < H:
        raise UserError(f"--head {args.head} is out of range: the model has {H} heads")
    labels = token_labels(tokenizer, ids)
    layer = args.layer % L
    paths = write_pngs(weights, labels, args.out, layer, args.head)
    data = page_data(weights, rollout(weights), labels, logit_lens(model, ids, args.top_k), tokenizer)
    paths.append(write_page(data, Path(args.out) / "attention.html", f"tformer attention: {Path(args.path).name}"))
    print(f"{len(ids)} tokens, {L} layers x {H} heads")
    for path in paths:
        print(path)
    return 0
