"""The data of a run: corpus -> tokenizer (trained once, cached) -> token shards -> batches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from tformer.data import Batcher, build_shards, default_cache_dir, load_corpus
from tformer.tokenizer import Tokenizer
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


def make_tokenizer(cfg, docs: list[str]) -> Tokenizer:
    """A tokenizer.json path, or BPE / char trained on `docs` (cached by corpus and vocab size);
    with a teacher, the teacher's (a given path must hold the same tokenizer)."""
    if cfg.teacher:
        teacher = teacher_tokenizer(cfg.teacher)
        if cfg.tokenizer not in ("bpe", "char"):
            check_same_tokenizer(Tokenizer.load(cfg.tokenizer), teacher, cfg.teacher)
        return teacher
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


def prepare_data(cfg) -> TrainData:
    if cfg.threads > 0:  # the tokenizers library reads this when its thread pool starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.threads))
    docs = load_corpus(cfg.data)
    tokenizer = make_tokenizer(cfg, docs)
    shards = build_shards(docs, tokenizer, val_fraction=cfg.val_fraction, cache_dir=_cache_root(cfg) / "shards")
    return TrainData(tokenizer, shards, cfg.seed)
