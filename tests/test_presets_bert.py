"""BERT-family presets: parameter counts equal HF's BertModel (pooler included) and ModernBertModel,
the configs equal what the HF converters read from the mirrored config.json, and `tformer params`
reports them."""

import json

import pytest
import torch
import transformers

from tformer.cli import main
from tformer.convert.hf_bert import bert_config_from_hf
from tformer.convert.hf_modernbert import modernbert_config_from_hf
from tformer.models import Encoder, build_model, count_parameters
from tformer.presets import get_preset

# BertModel parameter counts (pooler included), as HF reports them for the source repos
PUBLISHED = {"bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888, "all-minilm-l6-v2": 22_713_216}
HF_SHAPES = {
    "bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "all-minilm-l6-v2": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
# ModernBertModel parameter counts (no pooler) and the answerdotai config.json fields that differ from
# transformers' ModernBertConfig defaults or define the architecture
MODERNBERT_PUBLISHED = {"modernbert-base": 149_014_272, "modernbert-large": 394_781_696}
MODERNBERT = dict(vocab_size=50368, global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0,
                  local_rope_theta=10000.0, max_position_embeddings=8192, hidden_activation="gelu", norm_eps=1e-5,
                  norm_bias=False, attention_bias=False, mlp_bias=False, classifier_bias=False, decoder_bias=True,
                  pad_token_id=50283, tie_word_embeddings=True)  # fmt: skip
MODERNBERT_SHAPES = {
    "modernbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
    "modernbert-large": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624),
}
HF_SHAPES.update(MODERNBERT_SHAPES)  # every encoder preset checked here (tests/test_presets.py skips these)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bert_preset_counts_equal_hf(name):
    config = get_preset(name)
    model = build_model(config, device="meta")
    assert isinstance(model, Encoder)
    assert count_parameters(model) == PUBLISHED[name]
    with torch.device("meta"):
        hf = transformers.BertModel(transformers.BertConfig(**HF_SHAPES[name]))
    assert sum(p.numel() for p in hf.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bert_preset_is_what_the_converter_reads(name):
    hf = transformers.BertConfig(**HF_SHAPES[name]).to_dict()
    assert bert_config_from_hf(hf) == get_preset(name)


def test_tformer_params_counts_a_bert_preset(capsys):
    assert main(["params", "bert-base-uncased", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc["total"] == PUBLISHED["bert-base-uncased"]
    assert acc["output"] == 0  # the MLM output is the tied embedding
    assert acc["ffn"] == 12 * (2 * 768 * 3072 + 3072 + 768) + 768 * 768 + 768  # the blocks FFNs and the pooler


@pytest.mark.parametrize("name", sorted(MODERNBERT_PUBLISHED))
def test_modernbert_preset_counts_equal_hf(name):
    model = build_model(get_preset(name), device="meta")
    assert isinstance(model, Encoder) and model.pooler is None
    assert count_parameters(model) == MODERNBERT_PUBLISHED[name]
    with torch.device("meta"):
        hf = transformers.ModernBertModel(transformers.ModernBertConfig(**MODERNBERT, **MODERNBERT_SHAPES[name]))
    assert sum(p.numel() for p in hf.parameters()) == MODERNBERT_PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(MODERNBERT_PUBLISHED))
def test_modernbert_preset_is_what_the_converter_reads(name):
    hf = transformers.ModernBertConfig(**MODERNBERT, **MODERNBERT_SHAPES[name]).to_dict()
    assert modernbert_config_from_hf(hf) == get_preset(name)
    layers = build_model(get_preset(name), device="meta").local
    assert layers == tuple(kind == "sliding_attention" for kind in hf["layer_types"])
