"""Parity with HF transformers for the encoder family (BERT): tiny random configs, HF model at
random init with every parameter perturbed, saved, loaded with the production converter, compared
in fp32 on CPU: hidden states and pooler of `BertModel`, logits of `BertForMaskedLM`, MLM and
next-sentence logits of `BertForPreTraining`, with padding and two segments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf_bert import bert_config_from_hf, load_hf_bert  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.models import (  # noqa: E402
    Encoder,
    MaskedLM,
    Pretraining,
    QuestionAnswering,
    SequenceClassifier,
    TokenClassifier,
    build_model,
)  # noqa: E402

ATOL = 1e-4
BERT = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=40, type_vocab_size=2)  # fmt: skip


def hf_model(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(vocab: int, T: int = 16, pads=(0, 3, 9)):
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    types = torch.zeros(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        if n:
            mask[row, -n:] = 0  # BERT pads on the right
        types[row, T // 2 :] = 1
    return tokens, mask, types


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@torch.no_grad()
def test_against_hf_bert_model(tmp_path, act):
    cfg = transformers.BertConfig(**BERT, hidden_act=act)
    hf = hf_model(transformers.BertModel, cfg)
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path)
    assert isinstance(ours, Encoder)
    tokens, mask, types = batch(cfg.vocab_size)
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types)
    hidden = ours(tokens, mask, types)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.pooled(hidden), ref.pooler_output, atol=ATOL, rtol=0)
    # no mask, no segments: HF's defaults (all real, all type 0)
    torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).last_hidden_state, atol=ATOL, rtol=0)
    # a padded row equals the same row alone, unpadded
    n = int(mask[2].sum())
    alone = ours(tokens[2:, :n], None, types[2:, :n])
    torch.testing.assert_close(hidden[2:, :n], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_against_hf_bert_masked_lm(tmp_path):
    cfg = transformers.BertConfig(**BERT)
    hf = hf_model(transformers.BertForMaskedLM, cfg)
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path, MaskedLM)
    assert ours.head.tok_emb[0].weight is ours.encoder.tok_emb.weight  # tied
    tokens, mask, types = batch(cfg.vocab_size)
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits
    real = mask.bool()
    torch.testing.assert_close(ours(tokens, mask, types)[real], ref[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_against_hf_bert_for_pretraining(tmp_path):
    cfg = transformers.BertConfig(**BERT)
    hf = hf_model(transformers.BertForPreTraining, cfg)
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path, Pretraining)
    tokens, mask, types = batch(cfg.vocab_size)
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types)
    mlm, nsp = ours(tokens, mask, types)
    real = mask.bool()
    torch.testing.assert_close(mlm[real], ref.prediction_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_against_hf_bert_classifiers_and_qa(tmp_path):
    cfg = transformers.BertConfig(**BERT, num_labels=3)
    tokens, mask, types = batch(cfg.vocab_size)
    real = mask.bool()
    for hf_class, ours_class in ((transformers.BertForSequenceClassification, SequenceClassifier),
                                 (transformers.BertForTokenClassification, TokenClassifier),
                                 (transformers.BertForQuestionAnswering, QuestionAnswering)):  # fmt: skip
        qa = ours_class is QuestionAnswering  # HF's QA head is num_labels wide: 2, start and end
        hf = hf_model(hf_class, transformers.BertConfig(**BERT) if qa else cfg)
        hf.save_pretrained(tmp_path / hf_class.__name__)
        ours = load_hf_bert(tmp_path / hf_class.__name__, ours_class)
        ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types)
        out = ours(tokens, mask, types)
        if ours_class is SequenceClassifier:
            assert out.shape == (3, 3)
            torch.testing.assert_close(out, ref.logits, atol=ATOL, rtol=0)
        elif ours_class is TokenClassifier:
            torch.testing.assert_close(out[real], ref.logits[real], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(out[0][real], ref.start_logits[real], atol=ATOL, rtol=0)
            torch.testing.assert_close(out[1][real], ref.end_logits[real], atol=ATOL, rtol=0)


def test_bert_config_maps_to_an_encoder_build_model_builds():
    cfg = bert_config_from_hf(transformers.BertConfig(**BERT).to_dict())
    assert (cfg.architecture, cfg.norm_placement, cfg.type_vocab_size, cfg.norm_eps) == ("encoder", "post", 2, 1e-12)
    model = build_model(cfg, device="meta")
    hf = transformers.BertModel(transformers.BertConfig(**BERT))
    assert isinstance(model, Encoder)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_unsupported_bert_configs_and_mismatched_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="position_embedding_type"):
        bert_config_from_hf({**transformers.BertConfig(**BERT).to_dict(), "position_embedding_type": "relative_key"})
    cfg = transformers.BertConfig(**BERT)
    hf_model(transformers.BertModel, cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cls.predictions"):
        load_hf_bert(tmp_path, MaskedLM)  # a BertModel has no MLM head


def test_tformer_load_reads_a_bert_directory_as_an_encoder(tmp_path):
    import tformer

    hf_model(transformers.BertModel, transformers.BertConfig(**BERT)).save_pretrained(tmp_path)
    assert isinstance(tformer.load(tmp_path), Encoder)
