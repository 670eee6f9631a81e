"""tformer -> HF export of the BERT family: `save_hf_bert` (and `tformer convert --to hf`) writes a
directory that transformers' BertModel / BertForMaskedLM / BertForPreTraining / classifiers
`from_pretrained` load with the same outputs, in fp32 on CPU, with padding and two segments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.cli import main  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf import save_hf  # noqa: E402
from tformer.convert.hf_bert import load_hf_bert, save_hf_bert  # noqa: E402
from tformer.models import Encoder, MaskedLM, Pretraining, SequenceClassifier, build_model  # noqa: E402
from tformer.models.build import init_weights  # noqa: E402
from tformer.presets.bert import bert_like, modernbert_like  # noqa: E402

ATOL = 1e-4
CONFIG = bert_like(vocab_size=90, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=40)


def ours(cls, config=CONFIG, **kw):
    torch.manual_seed(0)
    model = cls(config, **kw)
    init_weights(getattr(model, "encoder", model))  # heads keep torch's default init
    with torch.no_grad():
        for p in model.parameters():  # biases and norms off their zeros / ones
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch(T: int = 12, pads=(0, 4)):
    torch.manual_seed(1)
    tokens = torch.randint(1, CONFIG.vocab_size, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        if n:
            mask[row, -n:] = 0
    types = (torch.arange(T) >= T // 2).long().expand(len(pads), T)
    return tokens, mask, types


@torch.no_grad()
def test_encoder_export_loads_in_hf(tmp_path):
    model = ours(Encoder)
    save_hf(model, tmp_path)  # the dispatch `tformer convert --to hf` uses
    hf = transformers.BertModel.from_pretrained(tmp_path).eval()
    tokens, mask, types = batch()
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types)
    hidden = model(tokens, mask, types)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.pooled(hidden), ref.pooler_output, atol=ATOL, rtol=0)
    back = load_hf_bert(tmp_path)  # and the export reads back with every tensor equal
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_masked_lm_and_pretraining_exports_load_in_hf(tmp_path):
    tokens, mask, types = batch()
    real = mask.bool()
    mlm = ours(MaskedLM)
    save_hf_bert(mlm, tmp_path / "mlm")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(mlm(tokens, mask, types)[real], ref[real], atol=ATOL, rtol=0)
    pre = ours(Pretraining)
    save_hf_bert(pre, tmp_path / "pre")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "pre").eval()
    out = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types)
    logits, nsp = pre(tokens, mask, types)
    torch.testing.assert_close(logits[real], out.prediction_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, atol=ATOL, rtol=0)
    clf = ours(SequenceClassifier, n_labels=3)
    save_hf_bert(clf, tmp_path / "clf")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(clf(tokens, mask, types), ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_an_untied_masked_lm_keeps_its_own_output_both_ways(tmp_path):
    model = ours(MaskedLM, CONFIG.replace(tie_embeddings=False))
    save_hf_bert(model, tmp_path / "out")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    decoder = hf.cls.predictions.decoder.weight
    assert decoder.data_ptr() != hf.bert.embeddings.word_embeddings.weight.data_ptr()
    tokens, mask, types = batch()
    real = mask.bool()
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(model(tokens, mask, types)[real], ref[real], atol=ATOL, rtol=0)
    hf.save_pretrained(tmp_path / "from_hf")
    back = load_hf_bert(tmp_path / "from_hf", MaskedLM)
    assert torch.equal(back.head.output.weight, model.head.output.weight)


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
@torch.no_grad()
def test_tformer_convert_to_hf(tmp_path, capsys):
    model = build_model(CONFIG)
    tformer.save(model.eval(), tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    tokens, mask, types = batch()
    real = mask.bool()
    ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(model(tokens, mask, types)[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
def test_non_bert_encoders_are_refused(tmp_path, capsys):
    modern = modernbert_like(vocab_size=90, dim=32, n_layers=3, n_heads=4, ffn_dim=48)
    with pytest.raises(ConfigError, match="not BERT-shaped"):
        save_hf_bert(build_model(modern), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # learned positions and a GLU: neither BERT- nor ModernBERT-shaped (RoPE encoders export as ModernBERT)
    tformer.save(build_model(CONFIG.replace(activation="swiglu")), tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) != 0
    err = capsys.readouterr().err
    assert "not BERT-shaped" in err and "Traceback" not in err
