import math

import pytest

from tformer.train.optim import param_groups
from tformer.train.schedule import learning_rate
from tests.conftest import tiny_config
from tformer.models import build_model


def test_cosine_warmup_then_decay():
    lr = lambda s: learning_rate(s, "cosine", 1.0, warmup=10, max_steps=110, min_lr=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    for s in (10, 35, 60, 85, 109):
        progress = (s + 1 - 10) / 100
        assert lr(s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert lr(500) == pytest.approx(0.1)


def test_linear_and_constant():
    assert learning_rate(4, "linear", 2.0, 5, 105, 0.0) == pytest.approx(2.0)
    assert learning_rate(54, "linear", 2.0, 5, 105, 0.0) == pytest.approx(1.0)
    assert learning_rate(1000, "constant", 2.0, 5, 105) == 2.0


def test_inverse_sqrt_is_the_papers_schedule():
    # Vaswani et al.: d^-0.5 min(s^-0.5, s w^-1.5); normalised to peak lr at s = w
    w, d = 4000, 512
    for s in (1, 100, 4000, 10000, 100000):
        paper = d**-0.5 * min(s**-0.5, s * w**-1.5)
        peak = d**-0.5 * w**-0.5
        assert learning_rate(s - 1, "inverse_sqrt", 1.0, w, 0) == pytest.approx(paper / peak)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="cosine"):
        learning_rate(0, "step", 1.0, 1, 10)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(tiny_config(qkv_bias=True, positions="learned", tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
                       and not n.startswith(("tok_emb", "pos_emb"))}
    assert "output.weight" in decayed and "tok_emb.weight" not in decayed
    assert no_decay["weight_decay"] == 0.0
