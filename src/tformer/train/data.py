"""The data of a run, as batches of dicts (`tokens`, `targets`, ...; data/sft.py) on the run's device.

    text corpus              -> tokenizer (trained once, cached) -> token shards -> random windows
    chat / completion JSONL  -> the checkpoint's tokenizer and chat template -> examples -> (packed) rows
    preference JSONL         -> pairs of examples (DPO)

`prepare_data` tells them apart by the files: JSONL whose first record has the keys of a
fine-tuning format (data/sft.py) is read as examples, anything else as a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from tformer.data import Batcher, build_shards, default_cache_dir, eval_batches, load_corpus
from tformer.data.preference import PairSplit, encode_pair, fit_pairs
from tformer.data.sft import ExampleSplit, data_format, encode_records, fit_examples, read_records, record_format
from tformer.tokenizer import TOKENIZER_FILE, Tokenizer
from tformer.train.distill import check_same_tokenizer, teacher_tokenizer


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (pinned and non-blocking on CUDA); other entries as they are."""
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TrainData:
    """A text corpus: random windows to train on, consecutive ones to evaluate."""
    kind = "text"

    def __init__(self, tokenizer: Tokenizer, shards, seed: int):
        self.tokenizer, self.shards, self.seed = tokenizer, shards, seed
        self._batchers: dict = {}

    def train_batch(self, batch_size: int, seq_len: int, index: int, device, rank: int = 0, world: int = 1) -> dict:
        """Micro-batch number `index` of the run: the same windows for the same (seed, index). Of `world`
        data-parallel ranks, `rank` takes rows [rank*B, (rank+1)*B) of the global batch of B*world rows."""
        key = (batch_size * world, seq_len, str(device) if world == 1 else "cpu")
        if key not in self._batchers:
            self._batchers[key] = Batcher(self.shards.train, key[0], seq_len, device=key[2], seed=self.seed)
        x, y = self._batchers[key].get(index)
        if world > 1:
            rows = slice(rank * batch_size, (rank + 1) * batch_size)
            x, y = to_device({"x": x[rows], "y": y[rows]}, device).values()
        return {"tokens": x, "targets": y, "n_targets": y.numel()}

    def val_batches(self, batch_size: int, seq_len: int, device, max_batches: int | None = None):
        for x, y in eval_batches(self.shards.val, batch_size, seq_len, device=device, max_batches=max_batches):
            yield {"tokens": x, "targets": y, "n_targets": y.numel()}

    def bits_per_char(self, loss: float) -> float | None:
        return self.shards.val.bits_per_char(loss)


class ExampleData:
    """Fine-tuning examples (chat or completion) or preference pairs, split into train and val."""

    def __init__(self, kind: str, tokenizer: Tokenizer, template, train, val, stats: str):
        self.kind, self.tokenizer, self.template, self.train, self.val = kind, tokenizer, template, train, val
        self.stats = stats  # one line on what was read, truncated and dropped

    def train_batch(self, batch_size: int, seq_len: int, index: int, device, rank: int = 0, world: int = 1) -> dict:
        """Rows [index*B*world + rank*B, ... + B) of the epochs' order: rank `rank`'s share of the
        global batch `index` of B*world rows."""
        return to_device(self.train.batch(index * world + rank, batch_size), device)

    def val_batches(self, batch_size: int, seq_len: int, device, max_batches: int | None = None):
        for batch in self.val.eval_batches(batch_size, max_batches):
            yield to_device(batch, device)

    def bits_per_char(self, loss: float) -> None:
        return None


def _cache_root(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir().parent


def make_tokenizer(cfg, docs: list[str], start_from: Path | None = None) -> Tokenizer:
    """The run's tokenizer. A run that starts from a checkpoint's weights (`start_from`: the one
    resumed or the checkpoint given as the preset) uses that checkpoint's tokenizer; another one
    (--tokenizer PATH or char) is taken only when its vocabulary is the checkpoint's, since the weights
    mean its ids. With a teacher, the teacher's. Otherwise a tokenizer.json path, or BPE / char
    trained on `docs` (cached by corpus and vocab size)."""
    own = _checkpoint_tokenizer(start_from) if start_from is not None else None
    if cfg.teacher:
        tok = teacher_tokenizer(cfg.teacher)
        if cfg.tokenizer not in ("bpe", "char"):
            check_same_tokenizer(Tokenizer.load(cfg.tokenizer), tok, cfg.teacher)
    elif start_from is not None and cfg.tokenizer == "bpe":  # the default: the checkpoint's
        if own is None:
            raise ValueError(f"{start_from} has no {TOKENIZER_FILE}, so which tokenizer its weights were trained "
                             "with is unknown: pass that tokenizer with --tokenizer PATH")
        return own
    else:
        tok = _own_tokenizer(cfg, docs)
    if own is not None and cfg.teacher:
        _check_same_vocab(tok, own, f"the teacher {cfg.teacher}'s tokenizer", start_from,
                          "distill from a teacher that shares the checkpoint's tokenizer")
    elif own is not None:
        _check_same_vocab(tok, own, f"--tokenizer {cfg.tokenizer}", start_from,
                          "leave --tokenizer out to continue with the checkpoint's tokenizer")
    return tok


def _own_tokenizer(cfg, docs: list[str]) -> Tokenizer:
    if cfg.tokenizer not in ("bpe", "char"):
        return Tokenizer.load(cfg.tokenizer)
    h = hashlib.sha256(f"{cfg.tokenizer}|{cfg.vocab_size}|".encode())
    for doc in docs:
        h.update(hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest())
    path = _cache_root(cfg) / "tokenizers" / f"{h.hexdigest()[:20]}.json"
    if path.is_file():
        return Tokenizer.load(path)
    if cfg.tokenizer == "char":
        tok = Tokenizer.train_char(docs)
    else:
        tok = Tokenizer.train_bpe(docs, vocab_size=cfg.vocab_size)
    tok.save(path)
    return tok


def _checkpoint_tokenizer(path: Path) -> Tokenizer | None:
    return Tokenizer.load(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else None


def _check_same_vocab(tok: Tokenizer, own: Tokenizer, what: str, checkpoint: Path, fix: str) -> None:
    """Refuse a tokenizer whose token -> id map differs from the checkpoint's."""
    new, old = tok.hf.get_vocab(), own.hf.get_vocab()
    if new == old:
        return
    same = sum(1 for token, i in old.items() if new.get(token) == i)
    raise ValueError(
        f"{what} has a different vocabulary from {checkpoint}'s tokenizer ({len(new):,} tokens vs {len(old):,}; "
        f"{same:,} ids keep their meaning), so the checkpoint's weights would read its ids as other tokens: {fix}"
    )


def example_format(paths) -> str | None:
    """The fine-tuning format (data/sft.py) of the data files, or None for a text corpus."""
    files = [Path(p) for p in paths]
    if not files or not all(f.is_file() and f.suffix.lower() == ".jsonl" for f in files):
        return None
    for line in files[0].read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return None  # read_texts names the line
            return record_format(record) if isinstance(record, dict) else None
    return None


def prepare_examples(cfg, kind: str, start_from: Path | None) -> ExampleData:
    """Examples (or pairs) of cfg.data, and of cfg.val_data or a seeded cfg.val_fraction of them."""
    from tformer.chat import ChatTemplate

    if start_from is None and cfg.tokenizer in ("bpe", "char"):
        raise ValueError(f"the data is {kind} examples, which fine-tune a pretrained model: pass the checkpoint "
                         "to start from as --preset (or `tformer finetune CKPT`)")
    tokenizer = make_tokenizer(cfg, [], start_from)
    template = ChatTemplate.for_checkpoint(start_from, tokenizer) if start_from else ChatTemplate(None)
    records = read_records(cfg.data)
    if data_format(records) != kind:
        raise ValueError(f"{cfg.data[0]} holds {kind} examples but others differ: use one format per run")
    if cfg.val_data:
        val_records = read_records(cfg.val_data)
        if data_format(val_records) != kind:
            raise ValueError(f"--val-data holds {data_format(val_records)} examples, the training data {kind}")
    else:
        order = np.random.default_rng([cfg.seed, 7]).permutation(len(records))
        n_val = max(1, round(len(records) * cfg.val_fraction))
        if n_val >= len(records):
            raise ValueError(f"{len(records)} examples leave none to train on after holding out {n_val} for "
                             "validation: add examples, lower --val-fraction or pass --val-data")
        val_records = [records[i] for i in sorted(order[:n_val])]
        records = [records[i] for i in sorted(order[n_val:])]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    splits, notes = [], []
    for name, part in (("train", records), ("val", val_records)):
        if kind == "preference":
            items, cut, dropped = fit_pairs([encode_pair(r, w, template, tokenizer) for w, r in part], cfg.seq_len)
            split = PairSplit(items, cfg.seq_len, cfg.seed, pad) if items else None
        else:
            encoded = encode_records(part, kind, template, tokenizer, cfg.train_on_prompt)
            items, cut, dropped = fit_examples(encoded, cfg.seq_len)
            split = ExampleSplit(items, cfg.seq_len, cfg.packing, cfg.seed, pad) if items else None
        if split is None:
            raise ValueError(f"no {name} example has a trained token within --seq-len {cfg.seq_len}: "
                             "raise --seq-len or check the data with `tformer data inspect`")
        splits.append(split)
        notes.append(f"{name} {len(items)}" + (f" ({cut} cut to --seq-len, {dropped} dropped)" if cut or dropped
                                               else ""))
    return ExampleData(kind, tokenizer, template, *splits, f"{kind} examples: " + ", ".join(notes))


def prepare_data(cfg, start_from: Path | None = None) -> TrainData | ExampleData:
    """`start_from`: the checkpoint whose weights the run continues (resumed, or given as the preset)."""
    if cfg.threads > 0:  # the tokenizers library reads this when its thread pool starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.threads))
    if (kind := example_format(cfg.data)) is not None:
        return prepare_examples(cfg, kind, start_from)
    docs = load_corpus(cfg.data)
    tokenizer = make_tokenizer(cfg, docs, start_from)
    shards = build_shards(docs, tokenizer, val_fraction=cfg.val_fraction, cache_dir=_cache_root(cfg) / "shards")
    return TrainData(tokenizer, shards, cfg.seed)
