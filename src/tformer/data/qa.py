"""Extractive question answering (SQuAD; Rajpurkar et al. 2016): the answer is a span of the context.

    train.jsonl   {"id", "question", "context", "answers": {"text": ["..."], "answer_start": [char index]}}
                  a line (HF datasets' squad layout; "id" optional)
    train.json    SQuAD v1.1's own file: {"data": [{"paragraphs": [{"context", "qas": [...]}]}]}

Each example becomes one or more windows [CLS] question [SEP] context piece [SEP] (token types 0 then 1)
of at most max_len tokens: a context too long for one window is cut into pieces that overlap by
`stride` tokens (HF run_qa's doc_stride). A training window's label is the token span of the first
answer, or [CLS] (0, 0) when the answer is not wholly inside it. `best_answers` reads the span back:
the best start + end logit over context tokens, end >= start, at most `max_answer_tokens` long, over all
of an example's windows, mapped to characters through the tokens' offsets. `squad_scores` is the
official v1.1 script's exact match and F1 (answers normalised: lower case, no punctuation, no articles,
single spaces), each example scored against its best-matching gold answer.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.corpus import jsonl_values
from tformer.data.example_split import ExampleSplit
from tformer.inference.embed import pad_batch

PUNCTUATION = frozenset(string.punctuation)


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start)


def read_squad(path: str | Path) -> list[QAExample]:
    """The examples of a SQuAD .json or a .jsonl file; ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a SQuAD .json file or a .jsonl of "
                         '{"question", "context", "answers": {"text", "answer_start"}} lines')
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))["data"]
            records = [{**qa, "context": p["context"]} for article in data for p in article["paragraphs"]
                       for qa in p["qas"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a SQuAD file ({type(e).__name__}: {e}): expected "
                             '{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}') from None
        records = [(i + 1, {**r, "answers": {"text": [a["text"] for a in r.get("answers", [])],
                                             "answer_start": [a["answer_start"] for a in r.get("answers", [])]}})
                   for i, r in enumerate(records)]
    else:
        records = list(jsonl_values(path))
    examples = [_example(path, where, record) for where, record in records]
    if not examples:
        raise ValueError(f"{path} holds no questions")
    return examples


def _example(path: Path, where: int, r) -> QAExample:
    bad = f'{path}:{where}: expected {{"question", "context", "answers": {{"text": [...], "answer_start": [...]}}}}'
    if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k] for k in ("question", "context")):
        raise ValueError(bad)
    a = r.get("answers")
    if not isinstance(a, dict) or not isinstance(a.get("text"), list) or not isinstance(a.get("answer_start"), list) \
            or len(a["text"]) != len(a["answer_start"]) or not a["text"]:
        raise ValueError(bad + " with at least one answer")
    answers = list(zip(a["text"], a["answer_start"]))
    for text, start in answers:
        if not isinstance(start, int) or r["context"][start: start + len(text)] != text:
            raise ValueError(f"{path}:{where}: the answer {text!r} is not at character {start} of the context")
    return QAExample(str(r.get("id", where)), r["question"], r["context"], answers)


@dataclass
class Window:
    example: int  # index into the examples
    ids: list[int]
    types: list[int]
    offsets: list[tuple[int, int] | None]  # a context token's character span; None elsewhere
    start: int = 0  # the answer's token span in this window; (0, 0): [CLS], not inside
    end: int = 0


def windows(examples: Sequence[QAExample], tokenizer, cls: int, sep: int, max_len: int, stride: int,
            max_question: int = 64) -> list[Window]:
    """Every example's windows (module docstring), labelled with its first answer."""
    out = []
    for n, ex in enumerate(examples):
        question = tokenizer.hf.encode(ex.question, add_special_tokens=False).ids[:max_question]
        context = tokenizer.hf.encode(ex.context, add_special_tokens=False)
        room = max_len - len(question) - 3
        if room < 1:
            raise ValueError(f"max_len {max_len} leaves no room for the context after a {len(question)}-token question")
        ids, offsets = context.ids, context.offsets
        step = max(room - stride, 1)
        text, char = ex.answers[0]
        for first in range(0, max(len(ids) - stride, 1), step):
            piece = slice(first, min(first + room, len(ids)))
            head = [cls, *question, sep]
            w = Window(n, head + ids[piece] + [sep], [0] * len(head) + [1] * (len(ids[piece]) + 1),
                       [None] * len(head) + list(offsets[piece]) + [None])
            spans = [(i, o) for i, o in enumerate(w.offsets) if o is not None]
            inside = [i for i, (a, b) in spans if a < char + len(text) and b > char]
            if inside and spans[0][1][0] <= char and spans[-1][1][1] >= char + len(text):
                w.start, w.end = inside[0], inside[-1]
            out.append(w)
            if piece.stop == len(ids):
                break
    return out


class QASplit(ExampleSplit):
    """Windows of examples: shuffled epochs for training (a batch is a function of its index), ordered
    batches for evaluation."""

    def __init__(self, examples: list[QAExample], windows_: list[Window], pad_id: int, seed: int = 0):
        self.examples, self.windows, self.pad_id, self.seed = examples, windows_, pad_id, seed

    def __len__(self) -> int:
        return len(self.windows)

    def _collate(self, idx: Sequence[int]) -> dict:
        rows = [self.windows[i] for i in idx]
        tokens, mask = pad_batch([w.ids for w in rows], self.pad_id)
        types = pad_batch([w.types for w in rows])[0]
        return {"tokens": tokens, "token_types": types, "attention_mask": mask,
                "start": torch.tensor([w.start for w in rows]), "end": torch.tensor([w.end for w in rows]),
                "n_targets": len(rows)}


def best_answers(split: QASplit, starts: torch.Tensor, ends: torch.Tensor, max_answer_tokens: int = 30,
                 n_best: int = 20) -> list[str]:
    """Each example's answer text from its windows' (N, T) start and end logits (module docstring)."""
    best: dict[int, tuple[float, str]] = {}
    for w, s_logits, e_logits in zip(split.windows, starts.float(), ends.float()):
        context = [i for i, o in enumerate(w.offsets) if o is not None]
        allowed = torch.full_like(s_logits, float("-inf"))
        allowed[context] = 0
        s_top = (s_logits + allowed).topk(min(n_best, len(context))).indices.tolist()
        e_top = (e_logits + allowed).topk(min(n_best, len(context))).indices.tolist()
        for s in s_top:
            for e in e_top:
                if s <= e < s + max_answer_tokens:
                    score = (s_logits[s] + e_logits[e]).item()
                    if score > best.get(w.example, (float("-inf"), ""))[0]:
                        text = split.examples[w.example].context[w.offsets[s][0]: w.offsets[e][1]]
                        best[w.example] = (score, text)
    return [best.get(i, (0.0, ""))[1] for i in range(len(split.examples))]


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores(predictions: Sequence[str], examples: Sequence[QAExample]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent, as the official SQuAD v1.1 evaluation computes them."""
    def f1(prediction: str, gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        same = sum((Counter(p) & Counter(g)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    pairs = list(zip(predictions, examples))
    em = [max(normalize_answer(p) == normalize_answer(t) for t, _ in ex.answers) for p, ex in pairs]
    f = [max(f1(p, t) for t, _ in ex.answers) for p, ex in pairs]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f) / len(f)}
