"""Parity with HF transformers for MarianMTModel, the original-Transformer-shaped reference (post-norm,
sinusoidal positions, embeddings times sqrt(d_model), shared embeddings): tiny random configs, HF model
at random init with every trained parameter perturbed, converted both ways with the production
converter, compared in fp32 on CPU with padded sources."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.convert import save_hf  # noqa: E402
from tformer.convert.hf_marian import load_hf_marian, marian_config_from_hf, save_hf_marian  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.models import build_model  # noqa: E402
from tformer.models.encoder_decoder import EncoderDecoder  # noqa: E402
from tformer.presets import get_preset  # noqa: E402

ATOL = 1e-4
TINY = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            pad_token_id=98, decoder_start_token_id=98, eos_token_id=0, dropout=0.0)  # fmt: skip


def hf_marian(**fields):
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(**TINY, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:  # computed sinusoids, never stored
                p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(S: int = 11, T: int = 7):
    torch.manual_seed(1)
    src, tgt = torch.randint(2, 98, (3, S)), torch.randint(2, 98, (3, T))
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, -6:] = 0
    return src, tgt, mask


@pytest.mark.parametrize("act, scale", [("relu", True), ("swish", False)])
@torch.no_grad()
def test_against_hf_marian(tmp_path, act, scale):
    hf = hf_marian(activation_function=act, scale_embedding=scale)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_marian(tmp_path / "hf")
    c = ours.config
    assert (c.norm_placement, c.sinusoid_split, c.scale_embeddings) == ("post", True, scale)
    src, tgt, mask = batch()
    ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(ours(src, tgt, mask), ref, atol=ATOL, rtol=0)
    real = mask.bool()
    enc = hf.model.encoder(input_ids=src, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours.encode(src, mask)[real], enc[real], atol=ATOL, rtol=0)
    save_hf_marian(ours, tmp_path / "back")
    back = transformers.MarianMTModel.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits, ref,
                               atol=ATOL, rtol=0)
    assert isinstance(tformer.load(tmp_path / "hf"), EncoderDecoder)


@torch.no_grad()
def test_transformer_base_shape_exports_to_marian_with_zero_biases(tmp_path):
    """The original Transformer has no attention biases; Marian gets zeros there and equal logits."""
    cfg = get_preset("transformer-base").replace(vocab_size=99, dim=32, n_layers=2, n_decoder_layers=2, n_heads=4,
                                                 ffn_dim=48, max_seq_len=64, emb_dropout=0.0, resid_dropout=0.0)
    ours = build_model(cfg).eval()
    save_hf(ours, tmp_path)  # dispatches an EncoderDecoder to Marian (sinusoidal positions)
    hf = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    src, tgt, mask = batch()
    torch.testing.assert_close(hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                               ours(src, tgt, mask), atol=ATOL, rtol=0)


def test_unsupported_marian_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="separate source and target"):
        marian_config_from_hf({**transformers.MarianConfig(**TINY).to_dict(),
                               "share_encoder_decoder_embeddings": False})
    hf = hf_marian()
    hf.final_logits_bias.fill_(0.5)
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="final_logits_bias"):
        load_hf_marian(tmp_path)
