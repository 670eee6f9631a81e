"""The data of a run: corpus -> tokenizer (trained once, cached) -> token shards -> batches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from tformer.data import Batcher, build_shards, default_cache_dir, load_corpus
from tformer.tokenizer import TOKENIZER_FILE, Tokenizer
from tformer.train.distill import check_same_tokenizer, teacher_tokenizer


class TrainData:
    def __init__(self, tokenizer: Tokenizer, shards, seed: int):
        self.tokenizer, self.shards, self.seed = tokenizer, shards, seed
        self._batchers: dict = {}

    def train_batch(self, batch_size: int, seq_len: int, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch number `index` of the run: the same windows for the same (seed, index)."""
        key = (batch_size, seq_len, str(device))
        if key not in self._batchers:
            self._batchers[key] = Batcher(self.shards.train, batch_size, seq_len, device=device,
                                          seed=self.seed)
        return self._batchers[key].get(index)


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


def prepare_data(cfg, start_from: Path | None = None) -> TrainData:
    """`start_from`: the checkpoint whose weights the run continues (resumed, or given as the preset)."""
    if cfg.threads > 0:  # the tokenizers library reads this when its thread pool starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.threads))
    docs = load_corpus(cfg.data)
    tokenizer = make_tokenizer(cfg, docs, start_from)
    shards = build_shards(docs, tokenizer, val_fraction=cfg.val_fraction, cache_dir=_cache_root(cfg) / "shards")
    return TrainData(tokenizer, shards, cfg.seed)
