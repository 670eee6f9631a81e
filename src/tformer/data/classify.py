"""Labelled texts for sequence classification: CSV or JSONL files of (text, label) rows.

    train.csv    a header row naming the columns (text,label), then one example a row
    train.jsonl  {"text": "...", "label": "..."} a line

Labels are strings (a number is read as its text); `label_ids` maps them to ids in sorted order,
the map saved with the fine-tuned checkpoint as `id2label`. Rows become [CLS] text [SEP], cut to
max_len tokens (the final [SEP] kept), and batches pad on the right with an attention mask.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from tformer.data.corpus import jsonl_values
from tformer.data.example_split import ExampleSplit
from tformer.inference.embed import pad_batch


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) rows of a .csv or .jsonl file; ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a CSV or JSONL file of {text_column},{label_column} rows")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: expected a .csv or .jsonl file of {text_column},{label_column} rows")
    rows = _read_csv(path, text_column, label_column) if suffix == ".csv" else _read_jsonl(path, text_column,
                                                                                              label_column)
    if not rows:
        raise ValueError(f"{path} holds no examples: add {text_column},{label_column} rows")
    return rows


def _read_csv(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (text_column, label_column) if c not in columns]
            if missing:
                raise ValueError(f"{path}: no column {' or '.join(map(repr, missing))} in the header row "
                                 f"(found {', '.join(map(repr, columns)) or 'none'}); name the columns "
                                 f"{text_column},{label_column} or pass --text-column / --label-column")
            rows = []
            for lineno, record in enumerate(reader, start=2):
                text, label = record.get(text_column), record.get(label_column)
                if text is None or label is None or not text.strip() or not label.strip():
                    raise ValueError(f"{path}:{lineno}: an empty {text_column} or {label_column}; "
                                     "fill it in or remove the row")
                rows.append((text, label.strip()))
            return rows
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path} is not valid CSV ({e})") from None


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    rows = []
    for lineno, record in jsonl_values(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str) or not record[text_column]:
            raise ValueError(f'{path}:{lineno}: expected an object with a non-empty string "{text_column}", '
                             f'e.g. {{"{text_column}": "...", "{label_column}": "positive"}}')
        label = record.get(label_column)
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            raise ValueError(f'{path}:{lineno}: "{label_column}" must be a non-empty string or an integer')
        rows.append((record[text_column], str(label).strip()))
    return rows


def label_ids(labels: Sequence[str], source: str = "the training data") -> list[str]:
    """The sorted distinct labels (id2label); at least two are needed to classify."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"{source} has only one label ({names[0]!r} on every row): classification needs "
                         "at least two")
    return names


def label_counts(labels: Sequence[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(Counter(labels).items()))


def encode_texts(texts: Sequence[str], tokenizer, max_len: int) -> list[list[int]]:
    """[CLS] text [SEP] ids (the tokenizer's template), each cut to max_len with its last token kept."""
    rows = tokenizer.encode_batch(list(texts), template=True)
    return [r if len(r) <= max_len else r[: max_len - 1] + r[-1:] for r in rows]


class LabelledSplit(ExampleSplit):
    """Encoded rows and label ids: shuffled epochs for training, ordered batches for evaluation."""

    def __init__(self, rows: list[list[int]], labels: list[int], pad_id: int, seed: int = 0):
        self.rows, self.labels, self.pad_id, self.seed = rows, labels, pad_id, seed

    def __len__(self) -> int:
        return len(self.rows)

    def _collate(self, idx: Sequence[int]) -> dict:
        tokens, mask = pad_batch([self.rows[i] for i in idx], self.pad_id)
        labels = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return {"tokens": tokens, "attention_mask": mask, "labels": labels, "n_targets": len(idx)}


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 of (N,) predicted and true ids: F1 = 2TP / (2TP + FP + FN) per class,
    averaged without weights over the classes that occur in either (sklearn's f1_score(average="macro"))."""
    predictions, labels = predictions.cpu(), labels.cpu()
    f1 = []
    for c in torch.cat([predictions, labels]).unique().tolist():
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        f1.append(2 * tp / (2 * tp + fp + fn))
    accuracy = (predictions == labels).float().mean().item() if len(labels) else 0.0
    return {"accuracy": accuracy, "macro_f1": sum(f1) / len(f1) if f1 else 0.0}
