"""Parity of tformer's SSD mixer (tformer.nn.ssd) with HF transformers' Mamba2Mixer (its PyTorch path).

A tiny HF Mamba-2 layer at random init, every parameter perturbed (so a swapped dt_bias, A_log, D,
conv bias or norm weight must show), its weights copied name for name into an SSD layer (the same
z | xBC | dt layout of the input projection), outputs compared in fp32 on CPU. No downloads.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tformer.config import ModelConfig  # noqa: E402
from tformer.nn.ssd import SSD  # noqa: E402

transformers = pytest.importorskip("transformers")

NAMES = {"in_proj.weight": "w_in.weight", "conv1d.weight": "conv.weight", "conv1d.bias": "conv.bias",
         "dt_bias": "dt_bias", "A_log": "A_log", "D": "D", "norm.weight": "norm.weight",
         "out_proj.weight": "wo.weight"}


@pytest.mark.parametrize("chunk, T", [(4, 10), (16, 7)])
def test_against_hf_mamba2_mixer(chunk, T):
    hf_config = transformers.Mamba2Config(vocab_size=50, hidden_size=32, expand=2, head_dim=8, num_heads=8,
                                          n_groups=2, state_size=8, conv_kernel=4, chunk_size=chunk,
                                          num_hidden_layers=1, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    hf = transformers.Mamba2Model(hf_config).layers[0].mixer.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, norm="rmsnorm", norm_eps=1e-5,
                         ssd=dict(state_dim=8, head_dim=8, expand=2, n_groups=2, conv_width=4, chunk=chunk))
    ours = SSD(config).eval()
    hf_params = dict(hf.named_parameters())
    assert set(hf_params) == set(NAMES)
    ours.load_state_dict({NAMES[k]: v for k, v in hf_params.items()})
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-4, rtol=1e-4)
