"""Packed sequences (`segments`): each example in a packed row gets the logits it has alone."""

import pytest
import torch

from tformer.models import build_model
from tformer.nn.masks import segment_positions
from tests.conftest import tiny_config

POSITIONS = {
    "rope": {},
    "learned": dict(positions="learned", norm="layernorm", activation="gelu"),
    "alibi": dict(positions="alibi"),
    "sliding": dict(sliding_window=3),
}


def test_segment_positions_restart_per_segment():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("kind", list(POSITIONS))
def test_packed_logits_equal_each_example_alone(kind):
    model = build_model(tiny_config(**POSITIONS[kind])).eval()
    lengths = [5, 9, 3, 7]
    examples = [torch.randint(97, (n,)) for n in lengths]
    tokens = torch.cat(examples)[None]  # one row of 24 tokens
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(tokens, segments=segments)[0]
        alone = torch.cat([model(x[None])[0] for x in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_segments_refused_with_a_cache():
    model = build_model(tiny_config()).eval()
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="cache-free"):
        model(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(4), segments=torch.zeros(1, 4))
