import os

import pytest
import torch

from tformer.config import ModelConfig

# Reference models are built from configs at random init: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be on
# before Triton is imported (tformer.inference.kernels imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
