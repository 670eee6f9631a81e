"""`tformer eval longctx CKPT`: passkey, needle-in-a-haystack and RULER-style tasks by length and
depth; a table, heatmaps, JSON and the effective length (docs/longctx.md). `tformer eval task CKPT`: a
fine-tuned encoder or encoder-decoder scored on a test file (train/task_eval.py)."""

from __future__ import annotations

import argparse
import sys

from tformer.cli import UserError
from tformer.cli.decoding import add_model_options, load_model
from tformer.evals.longctx_run import DEFAULT_THRESHOLD

DESCRIPTION = """\
Ask a checkpoint for facts buried in long prompts, fully offline, and score its greedy answers: passkey
retrieval, needle-in-a-haystack (the haystack is consecutive text of the bundled Shakespeare corpus) and
RULER-style multi-key, multi-value and variable-tracking tasks. Each prompt has exactly the given length in the
checkpoint's tokens, with the queried fact at the given depth (0: the start of the haystack, 1: its end).
Prints accuracy by task and length and the effective length; writes OUT/longctx_<task>.png (depth x length
heatmaps) and OUT/longctx.json (every number and every answer)."""

EPILOG = """\
effective length: the longest length at which a task's accuracy, averaged over depths, is >= --threshold,
  with every shorter length of the grid passing too (RULER's definition; its bar is 0.856).
past max_seq_len: models whose positions are computed (RoPE with any scaling, ALiBi, T5's relative bias,
  sinusoids, none) are rebuilt with a longer context from the same weights; learned positions are refused.
  --rope-scaling applies a RoPE context extension at eval time, e.g. --rope-scaling yarn --rope-factor 4."""

ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: `tformer eval longctx CKPT`, `tformer eval task CKPT`",
                       description="Evaluations: long-context retrieval that needs no data beyond what tformer "
                                   "bundles, and a fine-tuned task model on a test file.")
    actions = p.add_subparsers(dest="action", metavar="EVAL", required=True)
    q = actions.add_parser("longctx", help="long-context retrieval by length and depth: heatmaps, effective length",
                           description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("path", metavar="CKPT", help="tformer checkpoint or HF model directory (with tokenizer.json)")
    q.add_argument("--tasks", default="passkey,niah,multikey,multivalue,vartrack",
                   help="comma-separated (default: all, %(default)s)")
    q.add_argument("--lengths", help="prompt lengths in tokens, comma-separated; k = 1024 (256,512,1k); "
                                     "default: max_seq_len / 4, / 2 and max_seq_len - 64")
    q.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="needle depths in [0, 1], comma-separated (default: %(default)s)")
    q.add_argument("--samples", type=int, default=4, help="prompts per task, length and depth (default: %(default)s)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="accuracy an effective length must reach (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the keys, values and haystack offsets (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=8,
                   help="prompts decoded together; fewer where long lengths run out of memory (default: %(default)s)")
    q.add_argument("--rope-scaling", choices=ROPE_SCALINGS, help="RoPE scaling to evaluate with (RoPE models)")
    q.add_argument("--rope-factor", type=float, help="the --rope-scaling factor")
    q.add_argument("--rope-original-len", type=int,
                   help="the context the model was trained at (default: its rope.original_max_seq_len, else "
                        "its max_seq_len)")
    add_model_options(q)
    t = actions.add_parser("task", help="score a fine-tuned encoder or encoder-decoder on a test file",
                           description="Score CKPT (tformer finetune's OUT/final, or an HF BERT/T5/Marian directory "
                                       "with the task's head) on --data without training: the metrics its "
                                       "fine-tuning reports (classify: accuracy, macro-F1; token-classify: entity "
                                       "F1; qa: exact match, F1; mlm: loss; seq2seq: exact match, BLEU, chrF).")
    t.add_argument("path", metavar="CKPT", help="the fine-tuned checkpoint")
    t.add_argument("--task", required=True, choices=("classify", "token-classify", "qa", "mlm", "seq2seq"))
    t.add_argument("--data", action="append", required=True, help="test file (repeatable), as the task reads it")
    t.add_argument("--batch-size", type=int, default=32, help="examples a forward (default: %(default)s)")
    t.add_argument("--max-len", type=int, default=128, help="tokens an example at most (default: %(default)s; "
                                                              "the model's positions if fewer)")
    t.add_argument("--eval-decode", type=int, default=0,
                   help="seq2seq: decode the first N pairs (default: 0, all of them)")
    for name in ("text_column", "label_column", "source_column", "target_column"):
        t.add_argument(f"--{name.replace('_', '-')}", default=None, help="as for tformer finetune")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    t.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: %(default)s)")
    t.set_defaults(func=run_task)
    p.set_defaults(func=run)


def run_task(args: argparse.Namespace) -> int:
    """`tformer eval task`: the metrics of a fine-tuned checkpoint on a test file."""
    import json

    import torch

    from tformer.train.encoder_tasks import EncoderTaskConfig
    from tformer.train.task_eval import evaluate_checkpoint

    columns = {k: getattr(args, k) for k in ("text_column", "label_column", "source_column", "target_column")
               if getattr(args, k) is not None}
    cfg = EncoderTaskConfig(task=args.task, checkpoint=args.path, data=args.data, batch_size=args.batch_size,
                            max_len=args.max_len, eval_decode=args.eval_decode or 10**9, **columns)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    metrics = evaluate_checkpoint(cfg, device)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


def parse_lengths(text: str) -> list[int]:
    """ "256,512,1k" -> [256, 512, 1024] (k = 1024, m = 1024 * 1024), sorted, each > 0."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1024, "m": 1024 * 1024}.get(part[-1:], 1)
        try:
            value = float(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            value = 0.0
        if value <= 0 or value != int(value):
            raise UserError(f"--lengths: {part!r} is not a positive whole number of tokens (write 256, 4096 or 4k)")
        out.append(int(value))
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            d = float(part)
        except ValueError:
            d = -1.0
        if not 0 <= d <= 1:
            raise UserError(f"--depths: {part.strip()!r} is not a number in [0, 1] (0: haystack start, 1: its end)")
        out.append(d)
    return sorted(set(out))


def _check(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.rope_scaling is None and (args.rope_factor is not None or args.rope_original_len is not None):
        raise UserError("--rope-factor and --rope-original-len go with --rope-scaling: name the scaling")


def run(args: argparse.Namespace) -> int:
    from tformer.evals.longctx import check_tasks
    from tformer.evals.longctx_report import format_length, table, write
    from tformer.evals.longctx_run import build_examples, context_needed, evaluate, prepare_model, rope_override
    from tformer.inference import load_tokenizer

    _check(args)
    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    depths = parse_depths(args.depths)
    lengths = parse_lengths(args.lengths) if args.lengths else None
    tokenizer = load_tokenizer(args.path)
    model = load_model(args)
    max_seq_len = model.config.max_seq_len
    lengths = lengths or sorted({max_seq_len // 4, max_seq_len // 2, max_seq_len - 64})
    examples = build_examples(tokenizer, tasks, lengths, depths, args.samples, args.seed)
    rope = None
    if args.rope_scaling is not None:
        rope = rope_override(model.config, args.rope_scaling, args.rope_factor, args.rope_original_len)
    context, room = context_needed(tokenizer, examples)
    model, note = prepare_model(model, context, rope, room)
    if note:
        print(f"note: {note}", file=sys.stderr)

    def progress(task: str, length: int, accuracy: float) -> None:
        print(f"{task} {format_length(length)}: {accuracy:.2f}", file=sys.stderr, flush=True)

    result = evaluate(model, tokenizer, examples, args.threshold, args.batch_size, progress)
    about = {"checkpoint": str(args.path), "max_seq_len": max_seq_len, "positions": model.config.positions,
             "rope": _rope_about(model.config), "samples": args.samples, "seed": args.seed}
    print(table(result))
    for path in write(result, args.out, about, title=_title(args.path, model.config)):
        print(path)
    return 0


def _rope_about(config) -> dict | None:
    if config.positions != "rope":
        return None
    import dataclasses

    return dataclasses.asdict(config.rope)


def _title(path: str, config) -> str:
    from pathlib import Path

    name = Path(path).resolve().name
    if config.positions == "rope" and config.rope.scaling != "none":
        return f"{name} (RoPE {config.rope.scaling} x{config.rope.factor:g})"
    return f"{name} ({config.positions} positions)"
