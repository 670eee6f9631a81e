"""`tformer data inspect FILE --ckpt CKPT`: one fine-tuning example as the model sees it, loss marked."""

from __future__ import annotations

import argparse
import sys

from tformer.cli import UserError

MARKS = {"plain": ("[[", "]]"), "color": ("\033[42;30m", "\033[0m")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at training data: `tformer data inspect FILE --ckpt CKPT`",
                       description="Inspect fine-tuning data.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser(
        "inspect",
        help="show one example rendered as training sees it, the tokens that carry the loss marked",
        description=(
            "Render example --index of FILE (chat, completion or preference JSONL) with CKPT's tokenizer and chat "
            "template, exactly as `tformer finetune` would, and mark the tokens that carry the loss: on a terminal "
            "in green, otherwise between [[ and ]]. Then count, over the whole file, the tokens and the share that "
            "carries the loss, and the examples --seq-len would cut."
        ),
    )
    q.add_argument("file", metavar="FILE")
    q.add_argument("--ckpt", required=True, help="the checkpoint to fine-tune (its tokenizer and chat template)")
    q.add_argument("--index", type=int, default=0, help="which example (0: the first)")
    q.add_argument("--seq-len", type=int, default=512, help="the fine-tuning run's --seq-len")
    q.add_argument("--train-on-prompt", action="store_true", help="as the run's --train-on-prompt")
    q.add_argument("--marks", choices=["auto", *MARKS], default="auto",
                   help="how loss-bearing tokens are shown (auto: color on a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tformer.chat import ChatTemplate
    from tformer.data.preference import encode_pair
    from tformer.data.sft import data_format, encode_records, loss_runs, read_records
    from tformer.tokenizer import Tokenizer

    if not (Path(args.ckpt) / "tokenizer.json").is_file():
        raise UserError(f"{args.ckpt} holds no tokenizer.json: pass the checkpoint you will fine-tune")
    tokenizer = Tokenizer.load(args.ckpt)
    template = ChatTemplate.for_checkpoint(args.ckpt, tokenizer)
    records = read_records([args.file])
    kind = data_format(records)
    if not 0 <= args.index < len(records):
        raise UserError(f"--index {args.index} is out of range: {args.file} holds {len(records)} examples")
    if kind == "preference":
        examples = [ex for where, r in records for ex in encode_pair(r, where, template, tokenizer)]
        shown = {"chosen": examples[2 * args.index], "rejected": examples[2 * args.index + 1]}
    else:
        examples = encode_records(records, kind, template, tokenizer, args.train_on_prompt)
        shown = {"": examples[args.index]}
    mode = args.marks if args.marks != "auto" else ("color" if sys.stdout.isatty() else "plain")
    start, end = MARKS[mode]
    where = records[args.index][0]
    note = " (the template is ChatML: the checkpoint has none)" if template.is_default and kind != "completion" else ""
    print(f"{where}: {kind} example{note}")
    for name, ex in shown.items():
        text = "".join(start + tokenizer.decode(ids.tolist()) + end if trained else tokenizer.decode(ids.tolist())
                       for trained, ids in loss_runs(ex))
        print(f"--- {name + ' ' if name else ''}{len(ex.ids)} tokens, {ex.n_trained} carry the loss ---")
        print(text)
    total = sum(len(ex.ids) for ex in examples)
    trained = sum(ex.n_trained for ex in examples)
    long = sum(len(ex.ids) > args.seq_len + 1 for ex in examples)
    none = sum(ex.n_trained == 0 for ex in examples)
    print(f"--- {args.file}: {len(records)} examples, {total:,} tokens, {trained:,} ({trained / max(total, 1):.0%}) "
          f"carry the loss; {long} longer than --seq-len {args.seq_len} + 1 (cut), {none} without a loss token ---")
    return 0
