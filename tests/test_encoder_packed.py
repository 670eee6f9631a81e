"""Padding-free (packed) encoder batches: sequences laid end to end in one row with `segments` give the
hidden states of the padded batch on its real tokens (BERT-shaped and ModernBERT-shaped models, the
heads too), through dense SDPA masks and through FlexAttention block masks; the masks follow
HF ModernBERT's sliding window; pack / unpack / segment_mean agree with mean_pool."""

import pytest
import torch

from tformer.config import ModelConfig
from tformer.inference.encoder_flex import use_flex_attention, use_sdpa
from tformer.models import MaskedLM, build_model
from tformer.models.encoder import mean_pool, pack, segment_mean, unpack
from tformer.nn.masks import encoder_mask
from tformer.presets.bert import bert_like, modernbert_like

ATOL = 1e-5
UNCOMPILED_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
BERT = bert_like(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64)
MODERNBERT = modernbert_like(vocab_size=50, dim=32, n_layers=4, n_heads=4, ffn_dim=48, sliding_window=3)
LENGTHS = (11, 3, 20, 7)


def padded(vocab: int, lengths=LENGTHS):
    torch.manual_seed(0)
    T = max(lengths)
    tokens = torch.randint(1, vocab, (len(lengths), T))
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return tokens * mask, mask


def model_of(config: ModelConfig):
    torch.manual_seed(1)
    return build_model(config).eval()


@pytest.mark.parametrize("config", [BERT, MODERNBERT], ids=["bert", "modernbert"])
@torch.no_grad()
def test_packed_equals_padded(config):
    model = model_of(config)
    tokens, mask = padded(config.vocab_size)
    hidden = model(tokens, mask)
    packed, segments = pack([t[m.bool()] for t, m in zip(tokens, mask)])
    assert packed.shape == segments.shape == (1, sum(LENGTHS))
    out = model(packed, segments=segments)
    for got, row, n in zip(unpack(out, segments), hidden, LENGTHS):
        torch.testing.assert_close(got, row[:n], atol=ATOL, rtol=0)
    torch.testing.assert_close(model(packed[0], segments=segments[0]), out[0])  # 1-D: one packed row
    torch.testing.assert_close(segment_mean(out, segments), mean_pool(hidden, mask), atol=ATOL, rtol=0)
    if config.type_vocab_size:  # token types travel with the packed tokens
        types = (torch.arange(tokens.shape[1]) >= 2).long().expand_as(tokens)
        ref = model(tokens, mask, types)
        packed_types, _ = pack([t[m.bool()] for t, m in zip(types, mask)])
        got = unpack(model(packed, token_types=packed_types, segments=segments), segments)
        torch.testing.assert_close(got[2], ref[2, : LENGTHS[2]], atol=ATOL, rtol=0)


@torch.no_grad()
def test_packed_masked_lm():
    torch.manual_seed(1)
    model = MaskedLM(MODERNBERT).eval()
    tokens, mask = padded(MODERNBERT.vocab_size)
    logits = model(tokens, mask)
    packed, segments = pack([t[m.bool()] for t, m in zip(tokens, mask)])
    got = unpack(model(packed, segments=segments), segments)
    torch.testing.assert_close(got[0], logits[0, : LENGTHS[0]], atol=ATOL, rtol=0)


@UNCOMPILED_FLEX
@pytest.mark.parametrize("config", [BERT, MODERNBERT], ids=["bert", "modernbert"])
@torch.no_grad()
def test_flex_attention_equals_sdpa(config):
    model = model_of(config)
    tokens, mask = padded(config.vocab_size)
    packed, segments = pack([t[m.bool()] for t, m in zip(tokens, mask)])
    ref_packed, ref_padded = model(packed, segments=segments), model(tokens, mask)
    use_flex_attention(model, compile=False)  # uncompiled: runs on CPU
    torch.testing.assert_close(model(packed, segments=segments), ref_packed, atol=ATOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(model(tokens, mask)[real], ref_padded[real], atol=ATOL, rtol=0)
    use_sdpa(model)
    torch.testing.assert_close(model(packed, segments=segments), ref_packed)


def test_flex_attention_refuses_dropout_and_non_encoders():
    model = model_of(BERT).train()
    use_flex_attention(model, compile=False)
    tokens, mask = padded(BERT.vocab_size)
    with pytest.raises(ValueError, match="dropout"):
        model(tokens, mask)
    with pytest.raises(TypeError, match="Encoder"):
        use_flex_attention(torch.nn.Linear(2, 2))


def test_window_mask_is_hf_modernbert_rule():
    # |q - k| <= window within the same sequence, padding keys hidden, a query always sees itself
    key_valid = torch.tensor([[1, 1, 1, 1, 0, 0]])
    m = encoder_mask(1, 6, key_valid, None, 1)[0, 0]
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    expected = (((q - k).abs() <= 1) & (k < 4)) | (q == k)
    assert torch.equal(m, expected)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    m = encoder_mask(1, 6, None, segments, None)[0, 0]
    assert torch.equal(m, (q < 3) == (k < 3))
    assert encoder_mask(2, 6, key_valid.expand(2, 6)).shape == (2, 1, 1, 6)  # padding only: no (T, T) mask


def test_bad_shapes_are_named():
    model = model_of(BERT)
    tokens, mask = padded(BERT.vocab_size)
    with pytest.raises(ValueError, match="segments must have the shape of tokens"):
        model(tokens, segments=torch.zeros(3, dtype=torch.long))
