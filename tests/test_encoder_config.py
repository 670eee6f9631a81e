"""The encoder's local / global attention fields of ModelConfig: validation names the field and the fix,
the layer pattern, and a ModernBERT-shaped model survives a tformer checkpoint round trip."""

import pytest
import torch

import tformer
from tformer.config import ConfigError, ModelConfig
from tformer.models import Encoder, build_model
from tformer.presets.bert import modernbert_like

SMALL = dict(vocab_size=40, dim=32, n_layers=5, n_heads=4, ffn_dim=48, max_seq_len=64)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(global_every=3, sliding_window=8), "encoders only"),  # a decoder
        (dict(architecture="encoder", first_attn_norm=False, norm_placement="post"), "norm_placement='pre'"),
        (dict(architecture="encoder", global_every=3), "needs sliding_window"),
        (dict(architecture="encoder", global_every=0, sliding_window=8), "positive integer"),
        (dict(architecture="encoder", rope_local_theta=1e4, sliding_window=8), "positions='rope'"),
        (dict(architecture="encoder", positions="rope", rope_local_theta=1e4), "sliding_window set"),
        (dict(architecture="encoder", positions="rope", sliding_window=8, rope_local_theta=-1.0), "> 0"),
    ],
)
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**SMALL, **fields)


def test_layer_pattern():
    cfg = modernbert_like(**SMALL, global_every=3)
    assert [cfg.is_local_layer(i) for i in range(5)] == [False, True, True, False, True]
    every_layer_local = ModelConfig(**SMALL, architecture="encoder", sliding_window=4)
    assert all(every_layer_local.is_local_layer(i) for i in range(5))
    assert not any(ModelConfig(**SMALL).is_local_layer(i) for i in range(5))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
@torch.no_grad()
def test_modernbert_shaped_checkpoint_round_trip(tmp_path):
    cfg = modernbert_like(**SMALL, sliding_window=2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model.layers[0].attn_norm, torch.nn.Identity) and model.pooler is None
    tformer.save(model, tmp_path)
    back = tformer.load(tmp_path)
    assert isinstance(back, Encoder) and back.config == cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(back(tokens), model(tokens))
