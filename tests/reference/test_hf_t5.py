"""Parity with HF transformers for T5 (v1.0: ReLU, tied and scaled head; v1.1: gated GELU, untied head):
tiny random configs, HF model at random init with every parameter perturbed, converted both ways
with the production converter, compared in fp32 on CPU with padded sources. Also: encoder outputs,
incremental decoding with caches, and the presets' parameter counts against HF models built on meta."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf_t5 import load_hf_t5, save_hf_t5, t5_config_from_hf, t5_config_to_hf  # noqa: E402
from tformer.models import build_model, count_parameters  # noqa: E402
from tformer.models.encoder_decoder import EncoderDecoder  # noqa: E402
from tformer.presets import get_preset  # noqa: E402

ATOL = 1e-4
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)  # fmt: skip
VERSIONS = {"v1.0": dict(feed_forward_proj="relu"),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def hf_t5(version: str):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **VERSIONS[version])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if version == "v1.1":  # transformers 5 ties lm_head at init; a v1.1 checkpoint has its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn(TINY["vocab_size"], TINY["d_model"]))
    return model


def batch(S: int = 11, T: int = 7):
    torch.manual_seed(1)
    src, tgt = torch.randint(2, TINY["vocab_size"], (3, S)), torch.randint(2, TINY["vocab_size"], (3, T))
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, -6:] = 0
    return src, tgt, mask


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@torch.no_grad()
def test_against_hf_t5(tmp_path, version):
    hf = hf_t5(version)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_t5(tmp_path / "hf")
    assert ours.config.tie_embeddings == ours.config.scale_output == (version == "v1.0")
    src, tgt, mask = batch()
    ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(ours(src, tgt, mask), ref, atol=ATOL, rtol=0)
    enc = hf.encoder(input_ids=src, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours.encode(src, mask)[real], enc[real], atol=ATOL, rtol=0)
    # tformer -> HF: from_pretrained gives the same logits
    save_hf_t5(ours, tmp_path / "back")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits, ref,
                               atol=ATOL, rtol=0)
    assert isinstance(tformer.load(tmp_path / "hf"), EncoderDecoder)  # convert.load_hf dispatches on model_type


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@torch.no_grad()
def test_incremental_decode_equals_full_forward(tmp_path, version):
    hf_t5(version).save_pretrained(tmp_path)
    ours = load_hf_t5(tmp_path)
    src, tgt, mask = batch()
    full = ours(src, tgt, mask)
    ours.setup_caches(ours.encode(src, mask), n_slots=tgt.shape[1], src_mask=mask)
    steps = [ours.decode_step(tgt[:, :3], torch.arange(3))]  # a prefill of 3, then one token at a time
    steps += [ours.decode_step(tgt[:, t : t + 1], torch.tensor([t])) for t in range(3, tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)
    ours.clear_caches()
    torch.testing.assert_close(ours(src, tgt, mask), full, atol=0, rtol=0)


# The published configs (config.json of google-t5/t5-small and google/t5-v1_1-small), as dicts: no download.
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                relative_attention_num_buckets=32, feed_forward_proj="relu", tie_word_embeddings=True)  # fmt: skip
T5_V1_1_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False)  # fmt: skip


T5_PRESETS = {"t5-small": (T5_SMALL, 60_506_624), "t5-v1_1-small": (T5_V1_1_SMALL, 76_961_152)}


@pytest.mark.parametrize("name", sorted(T5_PRESETS))
def test_preset_parameter_counts_equal_hf(name):
    hf_config, expected = T5_PRESETS[name]
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))
    n_hf = sum(p.numel() for p in hf.parameters())
    if not hf_config["tie_word_embeddings"] and hf.lm_head.weight is hf.shared.weight:
        n_hf += hf.lm_head.weight.numel()  # transformers 5 ties at init; a v1.1 checkpoint's head is its own
    preset = get_preset(name)
    assert count_parameters(build_model(preset, device="meta")) == n_hf == expected
    read = t5_config_from_hf(hf_config)  # the published config.json's fields
    for field in ("vocab_size", "dim", "n_layers", "decoder_layers", "n_heads", "head_dim", "ffn_dim", "activation",
                  "norm", "norm_eps", "positions", "rel_buckets", "rel_max_distance", "attn_scale", "tie_embeddings",
                  "scale_output", "qkv_bias", "ffn_bias"):  # fmt: skip
        assert getattr(read, field) == getattr(preset, field), field


def test_unsupported_t5_configs_are_refused():
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        t5_config_from_hf(transformers.T5Config(**TINY).to_dict() | {"feed_forward_proj": "gated-relu"})
    cfg = get_preset("t5-small")
    with pytest.raises(ConfigError, match="norm_placement"):
        t5_config_to_hf(cfg.replace(norm_placement="post"))
    with pytest.raises(ConfigError, match="scales the decoder output"):
        t5_config_to_hf(cfg.replace(scale_output=False))
