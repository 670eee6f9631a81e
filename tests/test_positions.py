"""Each positional scheme against a naive reference written from its paper."""

import math

import torch

from tformer.config import RopeConfig
from tformer.nn.position import alibi_slopes, sinusoidal_table
from tformer.nn.rope import RotaryEmbedding, apply_rope


def test_sinusoidal_matches_formula():
    n, d = 50, 16
    table = sinusoidal_table(n, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(table[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_alibi_slopes_power_of_two():
    # Press et al. 2022: for 8 heads the slopes are 1/2, 1/4, ..., 1/256
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def test_alibi_slopes_non_power_of_two():
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...)
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))


def _rope_naive(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by angle pos * theta^(-2i/D): the rotate-half form."""
    B, T, H, D = x.shape
    out = x.clone()
    for i in range(D // 2):
        freq = theta ** (-2 * i / D)
        ang = positions[:, :, None].float() * freq  # (B, T, 1)
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., i + D // 2] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


def test_rope_matches_rotation_of_pairs():
    x = torch.randn(2, 9, 3, 8)
    positions = torch.tensor([list(range(9)), list(range(5, 14))])
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim=8)
    got = apply_rope(x, *rope(positions, x.dtype))
    assert torch.allclose(got, _rope_naive(x, positions, 10000.0), atol=1e-5)


def test_rope_is_relative():
    # q.k after rotation depends only on the distance between positions
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = RotaryEmbedding(RopeConfig(theta=500.0), head_dim=16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), q.dtype)
        ck, sk = rope(torch.tensor([[pk]]), k.dtype)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(score(3, 1), score(12, 10), atol=1e-4)


def test_partial_rotary_leaves_tail_untouched():
    x = torch.randn(1, 4, 2, 8)
    rope = RotaryEmbedding(RopeConfig(partial_rotary_factor=0.5), head_dim=8)
    y = apply_rope(x, *rope(torch.arange(4)[None], x.dtype))
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., :4], _rope_naive(x[..., :4], torch.arange(4)[None], 10000.0), atol=1e-5)


def test_linear_scaling_divides_positions():
    lin = RotaryEmbedding(RopeConfig(scaling="linear", factor=4.0), head_dim=8)
    base = RotaryEmbedding(RopeConfig(), head_dim=8)
    pos = torch.arange(0, 40, 4)[None]
    assert torch.allclose(lin(pos, torch.float32)[0], base(pos // 4, torch.float32)[0], atol=1e-6)


def test_dynamic_ntk_unchanged_within_original_context():
    dyn = RotaryEmbedding(RopeConfig(scaling="dynamic", factor=2.0, original_max_seq_len=32), head_dim=8)
    base = RotaryEmbedding(RopeConfig(), head_dim=8)
    short, long = torch.arange(32)[None], torch.arange(64)[None]
    assert torch.allclose(dyn(short, torch.float32)[0], base(short, torch.float32)[0])
    # past it, the base grows: theta * (factor * L / L0 - (factor - 1)) ^ (D / (D - 2))
    theta = 10000.0 * (2.0 * 64 / 32 - 1) ** (8 / 6)
    expected = RotaryEmbedding(RopeConfig(theta=theta), head_dim=8)(long, torch.float32)[0]
    assert torch.allclose(dyn(long, torch.float32)[0], expected, atol=1e-5)
