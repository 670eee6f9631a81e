"""The batching every labelled-example split shares (classification, tagging, QA): batch `index` of a
run is batch index % steps of epoch index // steps, in that epoch's seeded permutation, so a batch
is a function of its index (a resumed run sees the batches the first run would have); evaluation
batches go in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ExampleSplit:
    """Subclasses give `__len__`, `_collate(indices) -> batch dict` and a `seed` attribute."""

    seed: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _collate(self, idx: Sequence[int]) -> dict:
        raise NotImplementedError

    def batch(self, index: int, batch_size: int) -> dict:
        per_epoch = -(-len(self) // batch_size)  # the last batch of an epoch may be short
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return self._collate(order[k * batch_size: (k + 1) * batch_size].tolist())

    def eval_batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self._collate(range(start, min(start + batch_size, len(self))))
