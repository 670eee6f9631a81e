"""T5 span corruption (tformer.data.span_corruption): exact noise and span counts, alternating spans
kept first, sentinels that put the text back together, determinism under a seed, and batches the
Seq2Seq objective trains an EncoderDecoder on."""

import pytest
import torch

from tformer.data.sft import IGNORE
from tformer.data.span_corruption import collate, corrupt, noise_mask
from tformer.models import build_model
from tformer.presets import get_preset
from tformer.train.objectives import Seq2Seq

SENTINEL, EOS = 99, 1


def restore(source: list[int], target: list[int]) -> list[int]:
    """The text again: each sentinel in the source replaced by its span from the target."""
    spans, current = {}, None
    for t in target[:-1]:
        if t > SENTINEL - 20:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [tok for s in source[:-1] for tok in (spans[s] if s > SENTINEL - 20 else [s])]


@pytest.mark.parametrize("n", [2, 7, 20, 64, 101])
def test_noise_counts_and_span_layout(n):
    gen = torch.Generator().manual_seed(n)
    mask = noise_mask(n, gen)
    n_noise = min(max(round(n * 0.15), 1), n - 1)
    assert int(mask.sum()) == n_noise
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
    assert int(starts.sum()) == min(max(round(n_noise / 3), 1), n_noise, n - n_noise)
    assert not mask[0]  # a kept span comes first


def test_corrupt_restores_and_is_deterministic():
    tokens = list(range(2, 80))
    source, target = corrupt(tokens, torch.Generator().manual_seed(0), SENTINEL, EOS)
    assert source[-1] == target[-1] == EOS and target[0] == SENTINEL
    assert restore(source, target) == tokens
    sentinels = [t for t in source if t > SENTINEL - 20]
    assert sentinels == list(range(SENTINEL, SENTINEL - len(sentinels), -1))
    assert corrupt(tokens, torch.Generator().manual_seed(0), SENTINEL, EOS) == (source, target)
    shares = [int(noise_mask(100, torch.Generator().manual_seed(s)).sum()) for s in range(5)]
    assert shares == [15] * 5


def test_batches_train_through_the_seq2seq_objective():
    gen = torch.Generator().manual_seed(0)
    pairs = [corrupt(list(range(2 + i, 30 + 2 * i)), gen, SENTINEL, EOS) for i in range(4)]
    batch = collate(pairs, start_id=0)
    B, T = batch["tokens"].shape
    assert batch["n_targets"] == sum(len(t) for _, t in pairs)
    for row, (_, t) in zip(batch["tokens"].tolist(), pairs):
        assert row[: len(t)] == [0, *t[:-1]]  # the start token, then the target shifted right
    assert ((batch["targets"] == IGNORE).sum(1) == T - torch.tensor([len(t) for _, t in pairs])).all()
    cfg = get_preset("t5-small").replace(vocab_size=100, dim=32, n_layers=1, n_heads=4, head_dim=8, ffn_dim=48,
                                         rel_buckets=8, rel_max_distance=16)
    loss = Seq2Seq(build_model(cfg))(batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
