import pytest
import torch

from tformer.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=96,
        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False, max_seq_len=64,
    )
    base.update(overrides)
    return ModelConfig(**base)
