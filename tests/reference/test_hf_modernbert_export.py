"""tformer -> HF export of ModernBERT: `save_hf_modernbert` (and `save_hf` / `tformer convert --to hf`, which
send encoders with RoPE or local/global layers there) writes a directory that transformers'
ModernBertModel / ModernBertForMaskedLM `from_pretrained` load with every tensor used and the same
outputs, in fp32 on CPU, with padding and a window shorter than the batch; the export reads back
with every tensor equal; an HF directory goes through a tformer checkpoint and back unchanged."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tformer  # noqa: E402
from tformer.cli import main  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf import save_hf  # noqa: E402
from tformer.convert.hf_modernbert import load_hf_modernbert, save_hf_modernbert  # noqa: E402
from tformer.models import Encoder, MaskedLM, build_model  # noqa: E402
from tformer.models.build import init_weights  # noqa: E402
from tformer.presets.bert import modernbert_like  # noqa: E402
from tformer.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-5
# layers 0 and 2 global, 1 and 3 local with |q - k| <= 3 (local_attention 6) in a batch of 16
CONFIG = modernbert_like(vocab_size=90, dim=32, n_layers=4, n_heads=4, ffn_dim=48, max_seq_len=64, sliding_window=3,
                         global_every=2)  # fmt: skip
BIASES = dict(qkv_bias=True, out_bias=True, ffn_bias=True, norm_bias=True, head_bias=True)


def ours(cls, config=CONFIG):
    torch.manual_seed(0)
    model = cls(config)
    init_weights(getattr(model, "encoder", model))
    with torch.no_grad():
        for p in model.parameters():  # biases and norms off their zeros / ones
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch(T: int = 16, pads=(0, 5, 11)):
    torch.manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        if n:
            mask[row, -n:] = 0
    return tokens, mask


def from_pretrained(cls, path, attn="sdpa"):
    model, info = cls.from_pretrained(path, attn_implementation=attn, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # every tensor written is read
    return model.eval()


def assert_same_tensors(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("activation", ["geglu_exact", "geglu", "swiglu"])
@torch.no_grad()
def test_encoder_export_loads_in_hf(tmp_path, activation, attn):
    model = ours(Encoder, CONFIG.replace(activation=activation))
    save_hf(model, tmp_path)  # the dispatch `tformer convert --to hf` uses
    hf = from_pretrained(transformers.ModernBertModel, tmp_path, attn)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"] * 2 and hf.config.sliding_window == 3
    tokens, mask = batch()
    real = mask.bool()
    ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(tokens, mask)[real], ref[real], atol=ATOL, rtol=0)
    assert_same_tensors(model, load_hf_modernbert(tmp_path))


@pytest.mark.parametrize("fields", [{}, BIASES], ids=["no-biases", "biases"])
@torch.no_grad()
def test_masked_lm_export_loads_in_hf(tmp_path, fields):
    model = ours(MaskedLM, CONFIG.replace(**fields))
    save_hf_modernbert(model, tmp_path)
    hf = from_pretrained(transformers.ModernBertForMaskedLM, tmp_path)
    assert hf.decoder.weight.data_ptr() == hf.model.embeddings.tok_embeddings.weight.data_ptr()  # tied on load
    tokens, mask = batch()
    real = mask.bool()
    ref = hf(input_ids=tokens, attention_mask=mask).logits
    torch.testing.assert_close(model(tokens, mask)[real], ref[real], atol=ATOL, rtol=0)
    assert_same_tensors(model, load_hf_modernbert(tmp_path, MaskedLM))


@torch.no_grad()
def test_an_untied_masked_lm_keeps_its_own_output_both_ways(tmp_path):
    """tie_word_embeddings=False: the head's own output matrix is written as `decoder.weight`, HF keeps it
    apart from the embedding, and it loads back (not the embedding in its place)."""
    model = ours(MaskedLM, CONFIG.replace(tie_embeddings=False))
    assert not torch.equal(model.head.output.weight, model.encoder.tok_emb.weight)
    save_hf_modernbert(model, tmp_path)
    hf = from_pretrained(transformers.ModernBertForMaskedLM, tmp_path)
    assert hf.decoder.weight.data_ptr() != hf.model.embeddings.tok_embeddings.weight.data_ptr()
    tokens, mask = batch()
    real = mask.bool()
    torch.testing.assert_close(model(tokens, mask)[real], hf(input_ids=tokens, attention_mask=mask).logits[real],
                               atol=ATOL, rtol=0)
    hf.save_pretrained(tmp_path / "from_hf")
    assert_same_tensors(model, load_hf_modernbert(tmp_path / "from_hf", MaskedLM))


def test_export_writes_the_tokenizer_and_its_special_ids(tmp_path):
    tok = Tokenizer.train_char("the quick brown fox", special_tokens=["[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    model = build_model(CONFIG.replace(vocab_size=tok.vocab_size))
    save_hf_modernbert(model, tmp_path, tokenizer=tok)
    hf = json.loads((tmp_path / "config.json").read_text())
    ids = {k: tok.token_to_id(t) for k, t in (("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"))}
    assert (hf["pad_token_id"], hf["cls_token_id"], hf["bos_token_id"]) == (ids["pad"], ids["cls"], ids["cls"])
    assert (hf["sep_token_id"], hf["eos_token_id"]) == (ids["sep"], ids["sep"])
    assert (tmp_path / "tokenizer.json").is_file()
    assert transformers.ModernBertConfig.from_pretrained(tmp_path).pad_token_id == ids["pad"]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"activation": "gelu"}, "activation='gelu'"),  # not a GLU
        ({"global_every": None}, "global_every=None"),  # every layer local
        ({"out_bias": True}, "out_bias=True"),  # HF's attention_bias covers Wqkv and Wo together
        ({"first_attn_norm": True}, "first_attn_norm=True"),
        ({"pooler": True}, "pooler=True"),
        ({"type_vocab_size": 2}, "type_vocab_size=2"),
    ],
)
def test_non_modernbert_encoders_are_refused(tmp_path, fields, named):
    model = build_model(CONFIG.replace(**fields))
    with pytest.raises(ConfigError, match="not ModernBERT-shaped") as e:
        save_hf(model, tmp_path / "x")
    assert named in str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
def test_cli_names_the_fields_of_a_non_exportable_encoder(tmp_path, capsys):
    tformer.save(build_model(CONFIG.replace(out_bias=True)), tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) != 0
    err = capsys.readouterr().err
    assert "not ModernBERT-shaped" in err and "out_bias=True" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
@torch.no_grad()
def test_cli_round_trip_hf_to_tformer_to_hf(tmp_path, capsys):
    cfg = transformers.ModernBertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=48, local_attention=6, global_attn_every_n_layers=2,
                                        global_rope_theta=80000.0, local_rope_theta=5000.0, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.ModernBertModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--to", "tformer"]) == 0
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--to", "hf"]) == 0
    capsys.readouterr()
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = from_pretrained(transformers.ModernBertModel, tmp_path / "back")
    assert back.config.rope_parameters == hf.config.rope_parameters
    tokens, mask = batch()
    real = mask.bool()
    ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(back(input_ids=tokens, attention_mask=mask).last_hidden_state[real], ref[real],
                               atol=ATOL, rtol=0)  # fmt: skip
