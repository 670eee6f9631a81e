"""`tformer generate` on an encoder-decoder (T5, Marian, the original Transformer): each --prompt is a
source; the output is the decoder's text for it, greedy or sampled (`seq2seq_generate`) or by beam
search (`beam_search` on an `EncoderDecoderStepper`)."""

from __future__ import annotations

import argparse
import sys

from tformer.cli import UserError


def run_seq2seq(args: argparse.Namespace, model, tokenizer, prompts: list[str], sampling, beam) -> int:
    """Decode every prompt as one right-padded batch; one source prints its output alone, several print
    `=== source` headers (and with --n-best each of the best outputs with its score)."""
    import torch

    from tformer.inference.beam import beam_search
    from tformer.inference.seq2seq import EncoderDecoderStepper, encode_texts, seq2seq_generate, start_id
    from tformer.inference.text import _first_stop, eos_ids

    refused = [f"--{n.replace('_', '-')}" for n in ("draft", "compile", "truncate_prompt") if getattr(args, n)]
    refused += ["--repetition-penalty"] * (args.repetition_penalty != 1.0)
    if refused:
        raise UserError(f"{args.path} is an encoder-decoder: {', '.join(refused)} apply to decoder-only models; "
                        "drop them")
    sources = encode_texts(tokenizer, prompts)
    start, ends = start_id(tokenizer), eos_ids(tokenizer)
    if beam is not None:
        result = beam_search(EncoderDecoderStepper(model, start), sources, args.max_new_tokens, beam, eos_ids=ends)
        outputs, scores = result.sequences, result.scores
    else:
        generator = None
        if args.seed is not None:
            generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(args.seed)
        rows = seq2seq_generate(model, sources, args.max_new_tokens, start, ends, sampling, generator)
        outputs, scores = [[row] for row in rows], [[None] for _ in rows]

    def text(row: list[int]) -> str:
        out = tokenizer.decode(row, skip_special_tokens=True)
        cut = _first_stop(out, args.stop)
        return out if cut is None else out[:cut]

    for prompt, rows, row_scores in zip(prompts, outputs, scores):
        if len(prompts) == 1 and len(rows) == 1:
            print(text(rows[0]))
            if row_scores[0] is not None:
                print(f"beam search: score {row_scores[0]:.4f}", file=sys.stderr)
            continue
        for rank, (row, score) in enumerate(zip(rows, row_scores), 1):
            label = f"=== {prompt!r}" + (f" #{rank} score {score:.4f}" if score is not None else "")
            print(f"{label}\n{text(row)}\n")
    return 0
