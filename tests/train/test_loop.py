"""Training loop: resume is exact, accumulation equals a big batch, smoothing, NaN stop, golden curve."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from tformer.models import build_model
from tformer.train.config import TrainConfig
from tformer.train.evaluate import lm_loss
from tformer.train.loop import TrainingDiverged, train, train_step
from tformer.train.objectives import NextToken
from tformer.train.state import checkpoint_dirs

TEXT = """ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
"""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 40)
    return path


def small_run(corpus, tmp_path, **overrides) -> TrainConfig:
    base = dict(
        preset="tiny-llama", data=[str(corpus)], tokenizer="char", batch_size=4, seq_len=32,
        max_steps=8, warmup=2, lr=1e-2, min_lr=1e-3, eval_every=4, eval_batches=2, log_every=1,
        out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), tensorboard=False,
        sample_tokens=0, keep_last=3, dropout=0.1, seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def train_losses(out_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_continues_exactly(corpus, tmp_path):
    cfg = small_run(corpus, tmp_path)
    train(cfg, progress=False)
    full = train_losses(tmp_path / "run")
    assert len(full) == 8
    # interrupt after step 4: drop the later checkpoint and resume from step 4
    for ckpt in checkpoint_dirs(cfg.out_dir):
        if ckpt.name != "step-000004":
            shutil.rmtree(ckpt)
    cfg.resume = True
    result = train(cfg, progress=False)
    resumed = train_losses(tmp_path / "run")
    assert result.step == 8
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]


def test_checkpoints_keep_last_and_best(corpus, tmp_path):
    cfg = small_run(corpus, tmp_path, max_steps=12, keep_last=2)
    train(cfg, progress=False)
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)] == ["step-000008", "step-000012"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no temp leftovers


def test_nan_loss_stops_with_last_good_checkpoint(corpus, tmp_path):
    cfg = small_run(corpus, tmp_path, lr=1e30, warmup=1, grad_clip=0.0, dropout=0.0, max_steps=40, eval_every=1)
    with pytest.raises(TrainingDiverged, match="loss became") as e:
        train(cfg, progress=False)
    good = checkpoint_dirs(cfg.out_dir)
    if good:  # every checkpoint written is loadable and finite
        assert str(good[-1]) in str(e.value)
        import tformer

        m = tformer.load(good[-1])
        assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_gradient_accumulation_equals_one_big_batch(grad_clip):
    """The loop's own step: 4 micro-batches of 2 rows update the weights as one batch of 8 does.

    Plain SGD (lr 1) makes the update the gradient itself, so a wrong scale shows (Adam's first
    step is nearly sign(gradient) and would hide one); clipping at 0.5 clips both gradients."""
    config = tiny_config(vocab_size=50)
    big, accumulated = build_model(config), build_model(config)
    accumulated.load_state_dict(big.state_dict())
    before = {k: v.clone() for k, v in big.named_parameters()}
    x, y = torch.randint(0, 50, (8, 12)), torch.randint(0, 50, (8, 12))
    with torch.no_grad():
        expected_loss = lm_loss(big(x), y)

    def step(model, pairs):
        batches = [{"tokens": a, "targets": b, "n_targets": b.numel()} for a, b in pairs]
        return train_step(model, NextToken(model), torch.optim.SGD(model.parameters(), lr=1.0), batches,
                          grad_clip)["loss"]

    torch.testing.assert_close(step(big, [(x, y)]), expected_loss)
    torch.testing.assert_close(step(accumulated, list(zip(x.chunk(4), y.chunk(4)))), expected_loss)
    moved = dict(accumulated.named_parameters())
    for name, p in big.named_parameters():
        assert not torch.equal(p, before[name]), name  # the step moved every parameter
        torch.testing.assert_close(moved[name] - before[name], p - before[name], atol=1e-6, rtol=1e-5, msg=name)
        assert p.grad is None and moved[name].grad is None  # gradients are cleared for the next step


def test_the_loop_steps_through_train_step(corpus, tmp_path, monkeypatch):
    """train() drives `train_step` with grad_accum micro-batches of (batch_size, seq_len)."""
    import tformer.train.loop as loop

    shapes = []

    def recording_step(model, objective, optimizer, micro_batches, *args):
        shapes.append([tuple(batch["tokens"].shape) for batch in micro_batches])
        return train_step(model, objective, optimizer, micro_batches, *args)

    monkeypatch.setattr(loop, "train_step", recording_step)
    train(small_run(corpus, tmp_path, max_steps=2, eval_every=100, grad_accum=3), progress=False)
    assert shapes == [[(4, 32)] * 3] * 2


def test_label_smoothing_matches_definition():
    logits, targets, eps = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5)), 0.1
    soft = (1 - eps) * F.one_hot(targets, 11).float() + eps / 11
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(lm_loss(logits, targets, eps), expected)


def test_eval_batches_zero_evaluates_the_whole_split(corpus, tmp_path):
    train(small_run(corpus, tmp_path, max_steps=4, eval_every=2, eval_batches=0), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # periodic, then the final (whole-split) evaluation
    assert evals[0]["val_tokens"] == evals[1]["val_tokens"] > 2 * 4 * 32


def test_bits_per_char_reported(corpus, tmp_path):
    result = train(small_run(corpus, tmp_path, max_steps=4, dropout=0.0), progress=False)
    # char level: one token per character, so bits/char = nats/token / ln 2
    assert math.isclose(result.val_bpc, result.val_loss / math.log(2), rel_tol=0.02)


# A tiny run's loss curve, recorded once (CPU, fp32, torch 2.13): a change to the model, the
# optimiser, the data order or the schedule shows up here.
GOLDEN = {1: 4.1974, 2: 3.9618, 3: 3.6943, 4: 3.4566, 5: 3.2905, 6: 3.1437, 7: 3.0093, 8: 3.249}


def test_golden_loss_curve(corpus, tmp_path):
    train(small_run(corpus, tmp_path, dropout=0.0), progress=False)
    got = train_losses(tmp_path / "run")
    assert {s: round(v, 4) for s, v in got.items()} == pytest.approx(GOLDEN, abs=2e-3)
