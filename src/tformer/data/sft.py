"""Supervised fine-tuning data: JSONL examples -> token ids with the loss-bearing tokens marked -> batches.

Formats (one JSON object a line; `record_format` tells them apart by their keys):

    chat        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    completion  {"prompt": "...", "completion": "..."}
    preference  {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}   (DPO: data/preference.py)

A chat example is rendered with the checkpoint's chat template (`tformer.chat`); the tokens of each
assistant turn, its end-of-turn marker included, carry the loss. A completion example is
prompt + completion + eos; the completion's tokens and the eos carry it. `train_on_prompt` puts the
loss on every token instead.

Batches are dicts of (B, T) tensors: `tokens`, `targets` (the next token, IGNORE where no loss) and,
packed, `segments` (the example each token belongs to: attention stays inside it and positions
restart, `Decoder.forward(segments=)`). Packing fills each row of seq_len tokens with whole examples in
order; unpacked, each row is one example right-padded to the batch's longest (no attention mask is
needed: causal attention never looks right). Batch `index` depends only on (seed, index), as the
pretraining batches do, so a resumed run sees the batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tformer.data.corpus import jsonl_values

IGNORE = -100  # the target of a position without loss (PyTorch's cross_entropy ignore_index)
FORMATS = {"chat": ("messages",), "completion": ("prompt", "completion"),
           "preference": ("prompt", "chosen", "rejected")}


@dataclass
class Example:
    """One example's token ids and which of them carry the loss (trained[i]: predict ids[i])."""
    ids: np.ndarray  # (L,) int64
    trained: np.ndarray  # (L,) bool

    @property
    def n_trained(self) -> int:
        return int(self.trained[1:].sum())  # the first token is never a target


def loss_runs(example: Example) -> list[tuple[bool, np.ndarray]]:
    """The example's tokens as runs of (carry the loss, ids), in order; the first token, never a
    target, carries none. What `tformer data inspect` shows."""
    trained = example.trained.copy()
    trained[0] = False
    cuts = [0, *np.flatnonzero(trained[1:] != trained[:-1]) + 1, len(trained)]
    return [(bool(trained[a]), example.ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def read_records(paths) -> list[tuple[str, dict]]:
    """(where, object) for every non-blank line of the JSONL files; `where` is "file:line"."""
    records = []
    for path in [Path(p) for p in paths]:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        for lineno, record in jsonl_values(path):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((f"{path}:{lineno}", record))
    if not records:
        raise ValueError(f"no examples in {', '.join(map(str, paths))}: the files are empty")
    return records


def record_format(record: dict) -> str | None:
    """"chat", "preference", "completion", or None (a pretraining text record or something else)."""
    for name in ("chat", "preference", "completion"):
        if all(key in record for key in FORMATS[name]):
            return name
    return None


def data_format(records: list[tuple[str, dict]]) -> str:
    """The one format of all `records`; mixed or unknown ones are refused, naming the first odd line."""
    first_where, first = records[0]
    kind = record_format(first)
    if kind is None:
        raise ValueError(f"{first_where}: an example needs the keys of one format: "
                         + "; ".join(f"{k} {list(v)}" for k, v in FORMATS.items()) + f"; got {sorted(first)}")
    for where, record in records:
        if record_format(record) != kind:
            raise ValueError(f"{where}: expected a {kind} example like {first_where} ({list(FORMATS[kind])}), "
                             f"got keys {sorted(record)}: use one format per run")
    return kind


def encode_chat(messages: list, template, tokenizer, train_on_prompt: bool = False) -> Example:
    """A conversation rendered by `template` (tformer.chat.ChatTemplate); assistant turns trained."""
    text, spans = template.assistant_spans(messages)
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
    trained = np.zeros(len(enc.ids), dtype=bool)
    for a, b in spans:
        trained |= (starts >= a) & (starts < b)
    if train_on_prompt:
        trained[:] = True
    return Example(np.array(enc.ids, dtype=np.int64), trained)


def encode_completion(prompt: str, completion: str, tokenizer, train_on_prompt: bool = False) -> Example:
    """[bos] prompt completion eos; the completion and eos trained. The bos comes first where the
    tokenizer's own post-processor puts one (Llama's `<|begin_of_text|>`), the eos wherever it has one."""
    head = tokenizer.encode(prompt, add_bos=adds_bos(tokenizer))
    tail = tokenizer.encode(completion, add_eos=tokenizer.eos_id is not None)
    trained = np.r_[np.full(len(head), train_on_prompt), np.ones(len(tail), dtype=bool)]
    return Example(np.array(head + tail, dtype=np.int64), trained)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's post-processor starts a text with its bos token (as HF's encode does)."""
    return tokenizer.bos_id is not None and tokenizer.hf.encode("a", add_special_tokens=True).ids[:1] == [
        tokenizer.bos_id]


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def encode_records(records, kind: str, template, tokenizer, train_on_prompt: bool = False) -> list[Example]:
    """The examples of chat or completion records; a bad record's error names its line."""
    from tformer.chat import ChatTemplateError

    examples = []
    for where, r in records:
        try:
            if kind == "chat":
                examples.append(encode_chat(r["messages"], template, tokenizer, train_on_prompt))
            else:
                prompt, completion = _text(r["prompt"], where, "prompt"), _text(r["completion"], where, "completion")
                examples.append(encode_completion(prompt, completion, tokenizer, train_on_prompt))
        except ChatTemplateError as e:
            raise ValueError(f"{where}: {e}") from None
    return examples


def fit_examples(examples: list[Example], seq_len: int) -> tuple[list[Example], int, int]:
    """Examples cut to seq_len + 1 tokens (one row and its last target); those left without a
    trained token are dropped. Returns (kept, number truncated, number dropped)."""
    kept, cut, dropped = [], 0, 0
    for ex in examples:
        if len(ex.ids) > seq_len + 1:
            ex, cut = Example(ex.ids[: seq_len + 1], ex.trained[: seq_len + 1]), cut + 1
        if ex.n_trained == 0 or len(ex.ids) < 2:
            dropped += 1
        else:
            kept.append(ex)
    return kept, cut, dropped


def _rows(examples: list[Example], order: np.ndarray, seq_len: int, packing: bool) -> list[list[int]]:
    """Example indices of each row: packed greedily in `order` into rows of <= seq_len inputs, or one each."""
    if not packing:
        return [[int(i)] for i in order]
    rows, row, used = [], [], 0
    for i in order:
        n = len(examples[i].ids) - 1  # inputs it takes
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    return rows + ([row] if row else [])


def collate(examples: list[Example], rows: list[list[int]], seq_len: int, packing: bool, pad_id: int = 0) -> dict:
    """Rows of examples -> a batch dict (module docstring); `n_targets` counts the trained targets."""
    width = seq_len if packing else max(len(examples[r[0]].ids) - 1 for r in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)  # padding: a segment of its own
    for b, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            ex = examples[i]
            n = len(ex.ids) - 1
            tokens[b, at: at + n] = ex.ids[:-1]
            targets[b, at: at + n] = np.where(ex.trained[1:], ex.ids[1:], IGNORE)
            segments[b, at: at + n] = k
            at += n
    batch = {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
             "n_targets": int((targets != IGNORE).sum())}
    if packing:
        batch["segments"] = torch.from_numpy(segments)
    return batch


class ExampleSplit:
    """The examples of one split and their batches (module docstring).

    Rows are formed once (packed in a seeded shuffle of the examples); each epoch visits them in a
    permutation of its own, drawn from (seed, epoch)."""

    def __init__(self, examples: list[Example], seq_len: int, packing: bool, seed: int, pad_id: int = 0):
        if not examples:
            raise ValueError("no examples to batch")
        self.examples, self.seq_len, self.packing, self.seed, self.pad_id = examples, seq_len, packing, seed, pad_id
        order = np.random.default_rng([seed, 2**31]).permutation(len(examples))
        self.rows = _rows(examples, order, seq_len, packing)
        self._order = (-1, None)  # (epoch, its row permutation)

    def _row(self, j: int) -> list[int]:
        epoch, k = divmod(j, len(self.rows))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self.rows[self._order[1][k]]

    def batch(self, index: int, batch_size: int) -> dict:
        """Training batch `index`: rows [index * B, (index + 1) * B) of the epochs' permutations."""
        rows = [self._row(index * batch_size + k) for k in range(batch_size)]
        return collate(self.examples, rows, self.seq_len, self.packing, self.pad_id)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Every example once, in file order."""
        rows = _rows(self.examples, np.arange(len(self.examples)), self.seq_len, self.packing)
        if max_batches is not None:
            rows = rows[: max_batches * batch_size]
        for first in range(0, len(rows), batch_size):
            yield collate(self.examples, rows[first: first + batch_size], self.seq_len, self.packing, self.pad_id)
