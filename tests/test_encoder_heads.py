"""SequenceClassifier's pooling: "mean" logits equal the classifier on `mean_pool` of the hidden states
(padding ignored, no pooler built), packed rows give the padded batch's logits, "cls" reads BERT's
pooler; the pooling round-trips through `save_with_head` / `load_with_head`; an unknown pooling and
an HF export of a mean-pooled classifier are refused."""

import pytest
import torch

from tformer.convert.hf_bert import save_hf_bert
from tformer.models.build import reset_buffers
from tformer.models.encoder import SequenceClassifier, mean_pool, pack
from tformer.presets.bert import bert_like

CONFIG = bert_like(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64)
LENGTHS = (9, 4, 13)


def padded(lengths=LENGTHS):
    torch.manual_seed(0)
    T = max(lengths)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return torch.randint(1, CONFIG.vocab_size, (len(lengths), T)) * mask, mask


@torch.no_grad()
def initialised(model: SequenceClassifier) -> SequenceClassifier:
    """Modules are built uninitialised (build_model's job); N(0, 0.02) matrices, unit norms, zero biases."""
    for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * 0.02 if p.dim() >= 2 else torch.ones_like(p) if "norm" in name else 0 * p)
    reset_buffers(model, "cpu")
    return model.eval()


def classifier(pooling: str, config=CONFIG) -> SequenceClassifier:
    torch.manual_seed(1)
    return initialised(SequenceClassifier(config, 3, pooling))


@torch.no_grad()
def test_mean_pooled_logits_are_the_classifier_on_mean_pool():
    model = classifier("mean")
    tokens, mask = padded()
    hidden = model.encoder(tokens, mask)
    expected = model.classifier(mean_pool(hidden, mask))
    torch.testing.assert_close(model(tokens, mask), expected, atol=1e-6, rtol=0)
    assert model.encoder.pooler is None and not any("pooler" in n for n in model.state_dict())
    other_padding = tokens.masked_fill(mask == 0, 7)  # what sits under the padding changes nothing
    torch.testing.assert_close(model(other_padding, mask), expected, atol=1e-5, rtol=0)
    packed, segments = pack([t[: n] for t, n in zip(tokens, LENGTHS)])
    torch.testing.assert_close(model(packed, segments=segments), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cls_pooling_reads_the_pooler():
    model = classifier("cls")
    tokens, mask = padded()
    hidden = model.encoder(tokens, mask)
    expected = model.classifier(torch.tanh(model.encoder.pooler.dense(hidden[:, 0])))
    torch.testing.assert_close(model(tokens, mask), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pooling='cls' reads one sequence a row"):
        packed, segments = pack([tokens[0, :9], tokens[1, :4]])
        model(packed, segments=segments)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling 'max'; choose one of cls, mean"):
        SequenceClassifier(CONFIG, 2, "max")


@torch.no_grad()
def test_pooling_round_trips_and_mean_is_not_exported_to_hf(tmp_path):
    from tformer.train.encoder_models import load_classifier, load_with_head, save_with_head
    from tests.test_mlm import bert_tokenizer

    tok = bert_tokenizer("good bad day was".split())
    config = CONFIG.replace(vocab_size=tok.vocab_size)
    model = classifier("mean", config)
    save_with_head(model, tmp_path / "ckpt", tok, ["a", "b", "c"])
    loaded, labels = load_classifier(tmp_path / "ckpt")
    assert loaded.pooling == "mean" and labels == ["a", "b", "c"]
    tokens, mask = torch.randint(1, tok.vocab_size, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    torch.testing.assert_close(loaded(tokens, mask), model(tokens, mask), atol=0, rtol=0)
    again, fresh = load_with_head(tmp_path / "ckpt", SequenceClassifier)
    assert again.pooling == "mean" and fresh == []  # the checkpoint's pooling by default
    as_cls, fresh = load_with_head(tmp_path / "ckpt", SequenceClassifier, pooling="cls")
    assert as_cls.pooling == "cls" and fresh == ["encoder.pooler.dense.weight", "encoder.pooler.dense.bias"]
    with pytest.raises(ValueError, match="BertForSequenceClassification reads the pooled \\[CLS\\] only"):
        save_hf_bert(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
