"""Held-out evaluation (tformer.train.evaluate): what training and `tformer quantize --eval` report."""

import math
import re

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from tformer.data import Split
from tformer.models import build_model
from tformer.train.evaluate import evaluate, lm_loss


def _split(n_tokens: int, vocab: int, chars_per_token: float = 3.0) -> Split:
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens).astype(np.uint16)
    return Split("val", tokens, n_chars=round(n_tokens * chars_per_token), n_bytes=n_tokens * 3)


def test_loss_is_the_mean_over_every_target_token():
    """3 windows of 8 in batches of 2: the short last batch weighs its 8 targets, not a third."""
    model = build_model(tiny_config(vocab_size=50))
    split = _split(3 * 8 + 1, 50)
    with torch.no_grad():
        windows = [torch.from_numpy(split.tokens[i * 8: i * 8 + 9].astype(np.int64)) for i in range(3)]
        losses = [lm_loss(model(w[None, :-1]), w[None, 1:]).item() for w in windows]
    got = evaluate(model, split, batch_size=2, seq_len=8)
    expected = sum(losses) / 3
    assert got["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert got["val_bpc"] == pytest.approx(expected / math.log(2) / split.chars_per_token, rel=1e-6)
    assert got["val_tokens"] == 24
    assert evaluate(model, split, batch_size=2, seq_len=8, max_batches=1)["val_tokens"] == 16
    with pytest.raises(ValueError, match="max_batches=0 evaluates nothing"):
        evaluate(model, split, batch_size=2, seq_len=8, max_batches=0)


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored_and_dropout_is_off(training):
    model = build_model(tiny_config(vocab_size=50, resid_dropout=0.5)).train(training)
    split = _split(200, 50)
    first = evaluate(model, split, batch_size=4, seq_len=16)
    assert model.training == training
    assert evaluate(model, split, batch_size=4, seq_len=16) == first  # no dropout draws in the pass


def test_a_diverged_model_reports_a_capped_perplexity():
    model = build_model(tiny_config(vocab_size=50))
    with torch.no_grad():
        model.output.weight.mul_(1e4)
    got = evaluate(model, _split(100, 50), batch_size=2, seq_len=16)
    assert got["val_loss"] > 50 and got["val_ppl"] == math.exp(50)


def test_quantize_eval_reports_the_training_evaluation(tmp_path, capsys, monkeypatch):
    """`tformer quantize --eval` prints `evaluate`'s perplexity and bits per character."""
    import tformer
    import tformer.data
    from tformer.cli import main
    from tformer.data import build_shards
    from tformer.presets import get_preset
    from tformer.tokenizer import Tokenizer

    text = "to be, or not to be: that is the question.\n" * 300
    monkeypatch.setattr(tformer.data, "load_corpus", lambda paths: [text])
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    tokenizer = Tokenizer.train_char([text])
    model = tformer.build_model(get_preset("tiny-llama"))
    tformer.save(model, tmp_path / "src", tokenizer=tokenizer)
    assert main(["quantize", str(tmp_path / "src"), "--mode", "int8", "--eval", "--eval-batches", "2",
                 "--seq-len", "32", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    expected = evaluate(model, build_shards([text], tokenizer).val, 4, 32, max_batches=2)
    ppl = re.search(r"perplexity \(([\d,]+) tokens\): original ([\d.]+), int8", out)
    bpc = re.search(r"bits per character: original ([\d.]+), int8 ([\d.]+)", out)
    assert ppl and bpc, out
    assert int(ppl[1].replace(",", "")) == expected["val_tokens"] == 2 * 4 * 32
    assert float(ppl[2]) == pytest.approx(expected["val_ppl"], abs=1e-4)
    assert float(bpc[1]) == pytest.approx(expected["val_bpc"], abs=1e-4)
    assert float(bpc[2]) == pytest.approx(float(bpc[1]), rel=0.01)  # int8 barely moves it
