"""`tformer answer CKPT --question Q --context C`: the answer span from an extractive QA model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tformer.cli import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "answer",
        help="answer a question from a context with an extractive QA encoder (`tformer finetune --task qa`)",
        description="Print the span of --context that answers --question, read off a QuestionAnswering model: "
                    "the final/ checkpoint of `tformer finetune CKPT --task qa` or an HF BertForQuestionAnswering "
                    "directory. A long context is read in overlapping windows.",
    )
    p.add_argument("path", help="QA checkpoint directory")
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--context", help="the text the answers come from")
    p.add_argument("--context-file", help="a UTF-8 file holding the context")
    p.add_argument("--max-len", type=int, default=384, help="tokens per window (default: 384, or the model's)")
    p.add_argument("--doc-stride", type=int, default=128, help="tokens two windows share (default: 128)")
    p.add_argument("--max-answer-tokens", type=int, default=30, help="the longest answer (default: 30 tokens)")
    p.add_argument("--json", action="store_true", help='print [{"question", "answer"}] as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.tokenizer import Tokenizer
    from tformer.train.encoder_models import load_saved, read_head_meta
    from tformer.train.qa_task import answer

    if not args.question:
        raise UserError("pass a question: --question TEXT (repeatable)")
    if (args.context is None) == (args.context_file is None):
        raise UserError("pass the context: --context TEXT or --context-file FILE (one of them)")
    context = args.context
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --context-file {args.context_file}: {e}") from None
    if not context.strip():
        raise UserError("the context is empty")
    if read_head_meta(args.path).get("head") != "QuestionAnswering":
        raise UserError(f"{args.path} has no question-answering head: fine-tune one with "
                        "`tformer finetune CKPT --task qa --data squad.jsonl`")
    model = load_saved(Path(args.path))[0]
    tokenizer = Tokenizer.load(args.path)
    room = min(args.max_len, model.config.max_seq_len)
    if not 0 <= args.doc_stride < room // 2:
        raise UserError(f"--doc-stride must be in [0, {room // 2}) for windows of {room} tokens")
    answers = [answer(model, tokenizer, q, context, room, args.doc_stride, args.max_answer_tokens)
               for q in args.question]
    if args.json:
        print(json.dumps([{"question": q, "answer": a} for q, a in zip(args.question, answers)]))
    else:
        for q, a in zip(args.question, answers):
            print(a if len(answers) == 1 else f"{q}\t{a}")
    return 0
