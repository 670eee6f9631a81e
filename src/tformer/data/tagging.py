"""Token classification (named entities, parts of speech): words with one tag each.

    train.jsonl   {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]}
    train.conll   one word a line, its tag in the last column ("EU NNP B-NP B-ORG"), a blank line between
                  sentences, `-DOCSTART-` lines skipped (the CoNLL-2003 layout)

Words are tokenized as pre-split words through the tokenizer's template ([CLS] ... [SEP]); a word's
tag goes on its first sub-token, the other sub-tokens and the specials are IGNORE (BERT's recipe, and
HF's run_ner). A sentence longer than max_len tokens is cut (its [SEP] kept); the words cut off are
neither trained nor scored.

`entities` reads BIO / IOB2 tag sequences as seqeval does by default (an I- tag of a different type, or
after O, starts an entity), so `entity_scores` is seqeval's micro precision, recall and F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tformer.data.corpus import jsonl_values
from tformer.data.example_split import ExampleSplit
from tformer.data.sft import IGNORE
from tformer.inference.embed import pad_batch


def read_tagged(path: str | Path, words_key: str = "tokens", tags_key: str = "tags") -> list[tuple[list, list]]:
    """(words, tags) sentences of a .jsonl or CoNLL file; ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a .jsonl file of {{\"{words_key}\", \"{tags_key}\"}} "
                         "lines or a CoNLL file")
    rows = _read_jsonl(path, words_key, tags_key) if path.suffix.lower() == ".jsonl" else _read_conll(path)
    if not rows:
        raise ValueError(f"{path} holds no sentences")
    return rows


def _read_jsonl(path: Path, words_key: str, tags_key: str) -> list[tuple[list, list]]:
    rows = []
    for lineno, record in jsonl_values(path):
        words, tags = (record.get(words_key), record.get(tags_key)) if isinstance(record, dict) else (None, None)
        ok = (isinstance(words, list) and isinstance(tags, list) and words and len(words) == len(tags)
              and all(isinstance(w, str) and w for w in words) and all(isinstance(t, (str, int)) for t in tags))
        if not ok:
            raise ValueError(f'{path}:{lineno}: expected {{"{words_key}": [words], "{tags_key}": [one tag a word]}}, '
                             'non-empty lists of equal length, e.g. {"tokens": ["EU", "rejects"], '
                             '"tags": ["B-ORG", "O"]}')
        rows.append(([w for w in words], [str(t) for t in tags]))
    return rows


def _read_conll(path: Path) -> list[tuple[list, list]]:
    rows, words, tags = [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    for lineno, line in enumerate([*lines, ""], start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                rows.append((words, tags))
            words, tags = [], []
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}:{lineno}: expected a word and its tag (the last column), got {line!r}")
        words.append(fields[0])
        tags.append(fields[-1])
    return rows


def encode_tagged(tokenizer, sentences: Sequence[tuple[list, list]], tag_ids: dict, max_len: int):
    """(token id rows, label rows with IGNORE off first sub-tokens, first sub-token index of each word
    kept) of `sentences`."""
    rows, labels, firsts = [], [], []
    for words, tags in sentences:
        enc = tokenizer.hf.encode(list(words), is_pretokenized=True, add_special_tokens=True)
        ids, word_ids = enc.ids, enc.word_ids
        if len(ids) > max_len:  # keep the closing special
            ids, word_ids = ids[: max_len - 1] + ids[-1:], word_ids[: max_len - 1] + word_ids[-1:]
        row_labels, first, seen = [IGNORE] * len(ids), [], set()
        for i, w in enumerate(word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                row_labels[i] = tag_ids[tags[w]]
                first.append(i)
        rows.append(ids)
        labels.append(row_labels)
        firsts.append(first)
    return rows, labels, firsts


class TaggedSplit(ExampleSplit):
    """Encoded sentences: shuffled epochs for training (a batch is a function of its index), ordered
    batches for evaluation; `tags` keeps each sentence's gold tags for entity scoring."""

    def __init__(self, rows, labels, firsts, tags, pad_id: int, seed: int = 0):
        self.rows, self.labels, self.firsts, self.tags = rows, labels, firsts, tags
        self.pad_id, self.seed = pad_id, seed

    def __len__(self) -> int:
        return len(self.rows)

    def _collate(self, idx: Sequence[int]) -> dict:
        tokens, mask = pad_batch([self.rows[i] for i in idx], self.pad_id)
        labels = pad_batch([self.labels[i] for i in idx], IGNORE)[0]
        return {"tokens": tokens, "attention_mask": mask, "labels": labels, "n_targets": int((labels != IGNORE).sum())}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO / IOB2 sequence (seqeval's default reading)."""
    out, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-") if tag != "O" else ("O", "", "")
        begins = prefix == "B" or (prefix == "I" and name != kind) or prefix not in ("B", "I", "O")
        if kind is not None and (prefix == "O" or begins):
            out.add((kind, start, i - 1))
            kind = None
        if prefix != "O" and (begins or kind is None):
            start, kind = i, name or tag
    return out


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 of exact entity matches, and word accuracy, over sentences."""
    tp = n_pred = n_gold = right = words = 0
    for g, p in zip(gold, predicted):
        ge, pe = entities(g), entities(p)
        tp, n_pred, n_gold = tp + len(ge & pe), n_pred + len(pe), n_gold + len(ge)
        right, words = right + sum(a == b for a, b in zip(g, p)), words + len(g)
    precision, recall = tp / n_pred if n_pred else 0.0, tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / words if words else 0.0}
