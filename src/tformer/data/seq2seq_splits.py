"""Training and validation splits for encoder-decoders, in the interface of the encoder tasks' splits
(`len`, `batch(index, batch_size)`, `eval_batches(batch_size)`): batches are a function of their index,
so a resumed run sees the batches the first run would have.

    PairSplit   (source, target) token pairs: each epoch a seeded permutation, cut into windows of
                WINDOW batches whose pairs are sorted by source length (little padding), the batches
                of a window in seeded order
    SpanSplit   token segments of a text corpus, span-corrupted as T5 pretrains (data/span_corruption.py)
                with a generator seeded by (seed, index); eval batches corrupt with one seeded generator,
                so every evaluation sees the same noise

Both collate into the `Seq2Seq` objective's batches (`span_corruption.collate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tformer.data.example_split import ExampleSplit
from tformer.data.span_corruption import collate, corrupt

WINDOW = 50  # batches sorted together by length


def _generator(*seed: int) -> torch.Generator:
    value = 0
    for s in seed:
        value = value * 1_000_003 + s
    return torch.Generator().manual_seed(value % (2**63))


class PairSplit(ExampleSplit):
    """(source ids, target ids) pairs, each ending in the end token; `texts` keeps the (source, target)
    strings for scoring decoded outputs. Its own `batch` sorts windows by length; evaluation batches go
    in order (ExampleSplit's)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], start_id: int, pad_id: int, seed: int = 0,
                 texts: list[tuple[str, str]] | None = None):
        if not pairs:
            raise ValueError("no (source, target) pairs")
        self.pairs, self.start_id, self.pad_id, self.seed, self.texts = pairs, start_id, pad_id, seed, texts

    def __len__(self) -> int:
        return len(self.pairs)

    def _collate(self, idx: Sequence[int]) -> dict:
        return collate([self.pairs[i] for i in idx], self.start_id, self.pad_id)

    def batch(self, index: int, batch_size: int) -> dict:
        per_epoch = -(-len(self.pairs) // batch_size)
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(len(self.pairs), generator=_generator(self.seed, epoch)).tolist()
        window, j = divmod(k, WINDOW)
        chunk = order[window * WINDOW * batch_size: (window + 1) * WINDOW * batch_size]
        chunk.sort(key=lambda i: len(self.pairs[i][0]))
        batches = [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        pick = torch.randperm(len(batches), generator=_generator(self.seed, epoch, window))[j].item()
        return self._collate(batches[pick])


class SpanSplit:
    """Token segments (each of at least 2 tokens), span-corrupted per batch: sentinels count down from
    `first_sentinel` (T5's <extra_id_0>), `n_sentinels` of them; sources and targets end in eos_id."""

    def __init__(self, segments: list[list[int]], first_sentinel: int, n_sentinels: int, eos_id: int,
                 start_id: int, pad_id: int, seed: int = 0, noise_density: float = 0.15,
                 mean_span_length: float = 3.0):
        if not segments:
            raise ValueError("no text to corrupt: the corpus is empty")
        if not 0 < noise_density < 1 or mean_span_length < 1:
            raise ValueError(f"noise density must be in (0, 1) and the mean span length >= 1, got {noise_density} "
                             f"and {mean_span_length}")
        longest = max(map(len, segments))
        spans = max(round(max(round(longest * noise_density), 1) / mean_span_length), 1)
        if spans > n_sentinels:
            raise ValueError(f"segments of {longest} tokens are cut into up to {spans} noise spans, but the tokenizer "
                             f"has {n_sentinels} sentinel tokens (<extra_id_0> down): use shorter segments "
                             "(--max-len) or a longer mean span")
        self.segments, self.seed = segments, seed
        self.ids = dict(first_sentinel=first_sentinel, eos_id=eos_id, noise_density=noise_density,
                        mean_span_length=mean_span_length)
        self.start_id, self.pad_id = start_id, pad_id

    def __len__(self) -> int:
        return len(self.segments)

    def _collate(self, idx: Sequence[int], generator: torch.Generator) -> dict:
        pairs = [corrupt(self.segments[i], generator, **self.ids) for i in idx]
        return collate(pairs, self.start_id, self.pad_id)

    def batch(self, index: int, batch_size: int) -> dict:
        per_epoch = -(-len(self.segments) // batch_size)
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(len(self.segments), generator=_generator(self.seed, epoch))
        return self._collate(order[k * batch_size: (k + 1) * batch_size].tolist(),
                             _generator(self.seed, 7, index))

    def eval_batches(self, batch_size: int):
        generator = _generator(self.seed, 11)
        for start in range(0, len(self.segments), batch_size):
            yield self._collate(range(start, min(start + batch_size, len(self.segments))), generator)


def segments(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive `length`-token pieces of a token stream (a last piece of fewer than 2 tokens dropped)."""
    return [ids[i: i + length] for i in range(0, len(ids), length) if len(ids[i: i + length]) >= 2]
