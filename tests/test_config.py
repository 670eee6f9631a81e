import pytest

from tformer.config import ConfigError, ModelConfig, RopeConfig


def test_defaults_fill_derived_sizes():
    c = ModelConfig(dim=64, n_heads=4)
    assert (c.n_kv_heads, c.head_dim, c.ffn_dim) == (4, 16, 256)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=100, n_heads=3), ["dim=100", "n_heads=3"]),
        (dict(dim=64, n_heads=8, n_kv_heads=3), ["n_heads=8", "n_kv_heads=3"]),
        (dict(activation="swish"), ["activation='swish'", "swiglu"]),
        (dict(norm="batchnorm"), ["norm='batchnorm'", "rmsnorm"]),
        (dict(positions="rotary"), ["positions='rotary'", "alibi"]),
        (dict(n_layers=0), ["n_layers"]),
        (dict(attn_dropout=1.5), ["attn_dropout"]),
        (dict(positions="rope", rope=RopeConfig(scaling="llama3", factor=8)), ["original_max_seq_len"]),
        (dict(positions="rope", rope=RopeConfig(scaling="cubic")), ["rope.scaling"]),
    ],
)
def test_invalid_configs_say_what_is_wrong(kwargs, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_explicit_head_dim_allows_indivisible_dim():
    c = ModelConfig(dim=100, n_heads=4, head_dim=32)
    assert c.head_dim == 32


def test_dict_round_trip_and_unknown_field():
    c = ModelConfig(dim=64, n_heads=4, positions="rope", rope=RopeConfig(theta=5e5))
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**c.to_dict(), "hidden_size": 3})
