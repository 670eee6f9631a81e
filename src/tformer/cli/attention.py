"""`tformer attention CKPT --text ... --out DIR`: attention maps (PNG) and the interactive explorer (HTML),
for decoders, encoders and encoder-decoders (`--target`: the decoder's text)."""

from __future__ import annotations

import argparse

from tformer.cli import UserError
from tformer.cli.decoding import add_model_options, load_model

DESCRIPTION = """\
Run a text through a checkpoint (decoder, encoder or encoder-decoder) and write its exact attention weights
(the reference formula, whatever kernels the model would use) for every layer and head: three PNGs for
--layer/--head (the head, the layer's head grid, the mean over heads) and DIR/attention.html, a self-contained
page (no network) with every layer and head, attention rollout and, for a decoder, the logit lens."""

EPILOG = """\
decoders (GPT-2, Llama, ...): causal maps, rollout and the logit lens.
encoders (BERT, ModernBERT): bidirectional maps (a ModernBERT local layer's zero outside its window) and
  rollout; no logit lens, since an encoder predicts no next token.
encoder-decoders (T5, Marian, the original Transformer): --text is the source; --target the target,
  teacher-forced, or left out the model's greedy output (at most --max-new-tokens). Encoder self-attention,
  decoder self-attention and cross-attention (target queries over source keys): PNGs named encoder_*,
  decoder_*, cross_*, and a selector on the page."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the options' help, the epilog's lines as written."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="attention maps of a text: PNG heatmaps and an interactive HTML explorer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("path", help="tformer checkpoint or HF model directory (with tokenizer.json)")
    p.add_argument("--text", required=True, help="the text to look at (an encoder-decoder's source)")
    p.add_argument("--target",
                   help="encoder-decoders: the target text, teacher-forced; left out: the model's greedy output")
    p.add_argument("--max-new-tokens", type=int, default=40,
                   help="encoder-decoders without --target: greedy tokens at most")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, default=0, help="layer of the PNGs (negative counts from the last)")
    p.add_argument("--head", type=int, default=0, help="head of the single-head PNG")
    p.add_argument("--top-k", type=int, default=5, help="decoders: logit-lens predictions per layer and position")
    add_model_options(p)
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    from tformer.inference import load_tokenizer

    tokenizer = load_tokenizer(args.path)
    if not tokenizer.encode(args.text):
        raise UserError("--text has no tokens: pass some text")
    return load_model(args), tokenizer


def _check_length(what: str, n: int, model) -> None:
    if n > model.config.max_seq_len:
        raise UserError(f"{what} is {n} tokens, more than the model's max_seq_len {model.config.max_seq_len}: "
                        "pass a shorter text")


def load_text(args: argparse.Namespace, model_and_tokenizer=None):
    """(model, tokenizer, ids) of a decoder for args.path and args.text, the text checked against the
    model's length."""
    model, tokenizer = model_and_tokenizer or _load(args)
    if not hasattr(model, "layers") or not hasattr(model, "hidden"):
        raise UserError(f"{args.path} is not a decoder-only model: the logit lens reads decoders")
    ids = tokenizer.encode(args.text)
    _check_length("--text", len(ids), model)
    if getattr(args, "top_k", 1) <= 0:
        raise UserError("--top-k must be > 0")
    return model, tokenizer, ids


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tformer.models import Encoder
    from tformer.models.encoder_decoder import EncoderDecoder

    model, tokenizer = _load(args)
    if args.target is not None and not isinstance(model, EncoderDecoder):
        raise UserError(f"--target is for encoder-decoder models; {args.path} is a {type(model).__name__}")
    if isinstance(model, EncoderDecoder):
        lines, paths, data = _seq2seq(args, model, tokenizer)
    elif isinstance(model, Encoder) or isinstance(getattr(model, "encoder", None), Encoder):
        lines, paths, data = _encoder(args, model, tokenizer)
    else:
        lines, paths, data = _decoder(args, model, tokenizer)
    from tformer.viz.explorer import write_page

    paths.append(write_page(data, Path(args.out) / "attention.html", f"tformer attention: {Path(args.path).name}"))
    print("\n".join(lines))
    for path in paths:
        print(path)
    return 0


def _layer_head(args: argparse.Namespace, weights, what: str = "") -> int:
    """args.layer (negative from the last) as an index of weights (L, H, ...), both checked."""
    L, H = weights.shape[:2]
    if not -L <= args.layer < L:
        raise UserError(f"--layer {args.layer} is out of range: the model has {L} {what}layers")
    if not 0 <= args.head < H:
        raise UserError(f"--head {args.head} is out of range: the model has {H} heads")
    return args.layer % L


def _decoder(args, model, tokenizer):
    """(printed lines, PNG paths, page data) of a decoder: causal maps, rollout, logit lens."""
    from tformer.viz.explorer import page_data
    from tformer.viz.lens import logit_lens
    from tformer.viz.maps import attention_weights, rollout, token_labels, write_pngs

    model, tokenizer, ids = load_text(args, (model, tokenizer))
    weights = attention_weights(model, ids)  # (L, H, T, T)
    layer = _layer_head(args, weights)
    labels = token_labels(tokenizer, ids)
    paths = write_pngs(weights, labels, args.out, layer, args.head)
    data = page_data(weights, rollout(weights), labels, logit_lens(model, ids, args.top_k), tokenizer)
    return [f"{len(ids)} tokens, {weights.shape[0]} layers x {weights.shape[1]} heads"], paths, data


def _encoder(args, model, tokenizer):
    """An encoder's bidirectional maps and rollout (text with the tokenizer's template, e.g. [CLS] ... [SEP])."""
    from tformer.viz.explorer import page_data
    from tformer.viz.maps import attention_weights, rollout, token_labels, write_pngs

    ids = tokenizer.encode_batch([args.text], template=True)[0]
    _check_length("--text", len(ids), model)
    weights = attention_weights(model, ids)  # (L, H, T, T)
    layer = _layer_head(args, weights)
    labels = token_labels(tokenizer, ids)
    paths = write_pngs(weights, labels, args.out, layer, args.head)
    data = page_data(weights, rollout(weights), labels, causal=False)
    return [f"{len(ids)} tokens, {weights.shape[0]} layers x {weights.shape[1]} heads (encoder: bidirectional; "
            "no logit lens, an encoder predicts no next token)"], paths, data


def _seq2seq(args, model, tokenizer):
    """An encoder-decoder's encoder, decoder and cross maps for --text (source) and --target (or greedy)."""
    from tformer.viz.explorer import seq2seq_page_data
    from tformer.viz.maps import printable, rollout, seq2seq_weights, token_labels, write_pngs

    start = tokenizer.pad_id  # T5's and Marian's decoder start token is their pad token
    if start is None:
        raise UserError(f"{args.path}'s tokenizer names no pad token, the decoder's start token (T5, Marian): "
                        "add <pad> to its tokenizer")
    source = tokenizer.encode_batch([args.text], template=True)[0]
    absolute = model.config.positions in ("learned", "sinusoidal")
    if absolute:
        _check_length("--text", len(source), model)
    if args.target is not None:
        target = tokenizer.encode_batch([args.target], template=True)[0]
        if not target:
            raise UserError("--target has no tokens: pass some text, or leave --target out for the greedy output")
        how = "teacher-forced --target"
    else:
        target = _greedy(args, model, source, start, tokenizer.eos_id)
        how = f"greedy output ({len(target)} tokens)"
    target = [start, *target]
    if absolute:
        _check_length("the target with its start token", len(target), model)
    weights = seq2seq_weights(model, source, target)
    src_labels, tgt_labels = token_labels(tokenizer, source), token_labels(tokenizer, target)
    layers = {name: _layer_head(args, w, f"{name} ") for name, w in weights.items()}  # all checked first
    paths = []
    for name, w in weights.items():
        layer = layers[name]
        queries = src_labels if name == "encoder" else tgt_labels
        keys = tgt_labels if name == "decoder" else src_labels
        paths += write_pngs(w, keys, args.out, layer, args.head, name, queries)
    rollouts = {name: rollout(weights[name]) for name in ("encoder", "decoder")}
    data = seq2seq_page_data(weights, rollouts, src_labels, tgt_labels)
    lines = [f"source {len(source)} tokens, target {len(target)} tokens (start token first; {how})",
             f"encoder {weights['encoder'].shape[0]} layers, decoder {weights['decoder'].shape[0]} layers, "
             f"{weights['encoder'].shape[1]} heads",
             f"target: {printable(tokenizer.decode(target[1:]))!r}"]
    return lines, paths, data


def _greedy(args, model, source: list[int], start: int, eos: int | None) -> list[int]:
    from tformer.inference.beam import beam_search
    from tformer.inference.seq2seq import EncoderDecoderStepper

    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be > 0")
    eos_ids = [] if eos is None else [eos]
    # one beam stopping at its first end id is greedy decoding (tests/test_beam.py)
    result = beam_search(EncoderDecoderStepper(model, start), [source], args.max_new_tokens, eos_ids=eos_ids,
                         beams=1, early_stopping=True)
    return result.sequences[0][0]
