"""`tformer finetune CKPT --task qa`: extractive question answering (SQuAD v1.1 style; data/qa.py) with a
QuestionAnswering model (the encoder and a start/end linear layer on every token), trained by
train/encoder_tasks.py's loop with the SpanExtraction objective. Windows of --max-len tokens overlap by
--doc-stride; evaluations add SQuAD's exact match and F1 of the best span of at most
--max-answer-tokens tokens. `answer` reads a span off a trained model for one question and context.
"""

from __future__ import annotations

from functools import partial

import torch

from tformer.data.qa import QAExample, QASplit, best_answers, read_squad, squad_scores, windows


def _ids(tokenizer) -> tuple[int, int, int]:
    from tformer.data.mlm import CLS_NAMES, SEP_NAMES, _find

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return _find(tokenizer, CLS_NAMES, "[CLS]"), _find(tokenizer, SEP_NAMES, "[SEP]"), pad


def qa_data(cfg, tokenizer):
    """(train split, val split, a line describing them)."""
    from tformer.train.encoder_tasks import train_val

    examples, val = train_val(cfg, read_squad)
    cls, sep, pad = _ids(tokenizer)

    def split(part, seed):
        return QASplit(part, windows(part, tokenizer, cls, sep, cfg.max_len, cfg.doc_stride), pad, seed)

    train, held = split(examples, cfg.seed), split(val, cfg.seed)
    held.score = partial(qa_metrics, split=held, max_answer_tokens=cfg.max_answer_tokens)
    return train, held, (f"{len(examples)} training questions ({len(train)} windows), {len(val)} validation "
                         f"questions ({len(held)} windows)")


@torch.no_grad()
def _logits(model, split: QASplit, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) start and end logits of every window, padded to the longest with -inf."""
    was = model.training
    model.eval()
    starts, ends = [], []
    T = max(len(w.ids) for w in split.windows)
    for batch in split.eval_batches(batch_size):
        s, e = model(batch["tokens"].to(device), batch["attention_mask"].to(device), batch["token_types"].to(device))
        pad = (0, T - s.shape[1])
        starts.append(torch.nn.functional.pad(s.float().cpu(), pad, value=float("-inf")))
        ends.append(torch.nn.functional.pad(e.float().cpu(), pad, value=float("-inf")))
    model.train(was)
    return torch.cat(starts), torch.cat(ends)


def qa_metrics(model, batch_size: int, device, split: QASplit, max_answer_tokens: int) -> dict[str, float]:
    """val_exact_match and val_f1 (SQuAD's, in percent) of the split's best spans."""
    predictions = best_answers(split, *_logits(model, split, batch_size, device), max_answer_tokens)
    scores = squad_scores(predictions, split.examples)
    return {"val_exact_match": scores["exact_match"], "val_f1": scores["f1"]}


def answer(model, tokenizer, question: str, context: str, max_len: int = 384, stride: int = 128,
           max_answer_tokens: int = 30) -> str:
    """The best answer span of `context` for `question` (empty when no span qualifies)."""
    example = QAExample("0", question, context, [("", 0)])
    cls, sep, pad = _ids(tokenizer)
    split = QASplit([example], windows([example], tokenizer, cls, sep, min(max_len, model.config.max_seq_len),
                                       stride), pad)
    device = next(model.parameters()).device
    return best_answers(split, *_logits(model, split, 8, device), max_answer_tokens)[0]
