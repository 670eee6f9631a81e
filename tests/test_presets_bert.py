"""BERT-family presets: parameter counts equal HF's BertModel (pooler included), the configs equal
what the HF converter reads from the mirrored config.json, and `tformer params` reports them."""

import json

import pytest
import torch
import transformers

from tformer.cli import main
from tformer.convert.hf_bert import bert_config_from_hf
from tformer.models import Encoder, build_model, count_parameters
from tformer.presets import get_preset

# BertModel parameter counts (pooler included), as HF reports them for the source repos
PUBLISHED = {"bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888, "all-minilm-l6-v2": 22_713_216}
HF_SHAPES = {
    "bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "all-minilm-l6-v2": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


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
