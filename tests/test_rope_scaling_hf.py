"""RoPE context-extension variants against HF transformers' own implementation.

Each case is an HF `rope_parameters` dict on a tiny LlamaConfig; tformer's RopeConfig comes from the
production converter (`tformer.convert.hf_config.config_from_hf`), so the mapping of HF's fields is
tested with the math. Compared: inverse frequencies and the cos/sin factor (ROPE_INIT_FUNCTIONS),
and cos/sin of HF's LlamaRotaryEmbedding at positions inside and past the original context (dynamic
NTK grows its base per length; YaRN scales cos/sin by its attention factor). Nothing downloads.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from tformer.convert.hf_config import config_from_hf  # noqa: E402
from tformer.nn.rope import RotaryEmbedding, rope_inv_freq  # noqa: E402

HEAD_DIM = 32
MAX_POS = 128  # the HF model's max_position_embeddings
ORIGINAL = 64  # original_max_position_embeddings of yarn / llama3

CASES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL),
    "yarn-betas": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, beta_fast=16.0,
                       beta_slow=2.0),
    "yarn-attention-factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL,
                                  attention_factor=1.3),
    "yarn-deepseek-mscale": dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=ORIGINAL,
                                 mscale=0.707, mscale_all_dim=1.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL),
    "llama3-bands": dict(rope_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                         original_max_position_embeddings=ORIGINAL),
}
THETAS = (10000.0, 500000.0)


def _hf_config(params: dict, theta: float, partial: float = 1.0) -> LlamaConfig:
    rope = {**params, "rope_theta": theta}
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    return LlamaConfig(vocab_size=32, hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=HEAD_DIM, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=MAX_POS,
                       rope_parameters=rope)


def _ours(hf: LlamaConfig):
    """(RopeConfig, head_dim) through the production converter."""
    cfg = config_from_hf(hf.to_dict())
    return cfg.rope, cfg.head_dim


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("name", [n for n in CASES if n != "dynamic"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_static_inv_freq_and_scale_match_hf(name, theta, partial):
    hf = _hf_config(CASES[name], theta, partial)
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[CASES[name]["rope_type"]](hf, "cpu")
    rope, head_dim = _ours(hf)
    inv_freq, scale = rope_inv_freq(rope, int(head_dim * rope.partial_rotary_factor))
    torch.testing.assert_close(inv_freq, ref_freq.float(), rtol=1e-5, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("seq_len", [ORIGINAL, MAX_POS, MAX_POS + 1, 3 * MAX_POS, 16 * MAX_POS])
def test_dynamic_inv_freq_matches_hf_at_each_length(theta, seq_len):
    hf = _hf_config(CASES["dynamic"], theta)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=seq_len)
    rope, head_dim = _ours(hf)
    ours = RotaryEmbedding(rope, head_dim)._dynamic_inv_freq(torch.arange(seq_len)[None])
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=0)
    if seq_len > MAX_POS:  # the base grew: the lowest frequency fell
        assert ours[-1] < rope_inv_freq(rope, head_dim)[0][-1]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seq_len", [ORIGINAL, 4 * MAX_POS])
def test_cos_sin_match_llama_rotary_embedding(name, seq_len):
    """cos/sin of every position of a sequence, each computed fresh (HF's dynamic update is stateful)."""
    hf = _hf_config(CASES[name], 10000.0)
    rope, head_dim = _ours(hf)
    positions = torch.arange(seq_len)[None]  # (1, T)
    x = torch.zeros(1, seq_len, HEAD_DIM)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(x, positions)
    cos, sin = RotaryEmbedding(rope, head_dim)(positions, torch.float32)
    # angles reach ~4 * MAX_POS radians: cos/sin of fp32 angles agree to ~1e-5 absolute
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-5)


def test_yarn_cos_sin_carry_the_attention_factor():
    """The test can fail: YaRN's cos/sin magnitude is its mscale 0.1 ln(8) + 1, not 1."""
    hf = _hf_config(CASES["yarn"], 10000.0)
    rope, head_dim = _ours(hf)
    cos, sin = RotaryEmbedding(rope, head_dim)(torch.arange(8)[None], torch.float32)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, 1.2079441541679836**2))
