import pytest

from tformer.config import ConfigError, ModelConfig, MoEConfig, RopeConfig
from tformer.presets import get_preset, list_presets


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
        (dict(positions="rope", rope={"scaling": "cubic"}), ["rope.scaling", "cubic", "yarn"]),
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


# Issue 24, point 2: derived fields follow what they derive from, unless given explicitly.


def test_replace_rederives_head_dim_and_ffn_dim():
    c = ModelConfig(dim=64, n_heads=4).replace(dim=128)
    assert (c.head_dim, c.ffn_dim, c.n_kv_heads) == (32, 512, 4)
    c = c.replace(n_heads=8)  # still derived after a replace
    assert (c.head_dim, c.n_kv_heads) == (16, 8)


def test_replace_on_a_preset_rederives_what_the_preset_left_to_derive():
    c = get_preset("shakespeare-bpe").replace(dim=256)  # the preset gives ffn_dim, not head_dim
    assert (c.head_dim, c.n_heads * c.head_dim, c.ffn_dim) == (64, 256, 512)
    c = get_preset("shakespeare-bpe").replace(dim=96, n_heads=3)  # n_kv_heads follows n_heads
    assert (c.n_kv_heads, c.head_dim) == (3, 32)
    assert get_preset("gpt2").replace(dim=1024, n_heads=16).ffn_dim == 4096  # HF n_inner null: 4 * dim


def test_indivisible_width_names_what_the_user_set():
    with pytest.raises(ConfigError) as e:
        get_preset("shakespeare-bpe").replace(dim=100, n_heads=3)
    assert "dim=100" in str(e.value) and "n_heads=3" in str(e.value) and "n_kv_heads" not in str(e.value)


def test_explicit_values_are_kept():
    c = ModelConfig(dim=64, n_heads=4, head_dim=32, ffn_dim=100).replace(dim=128)
    assert (c.head_dim, c.ffn_dim) == (32, 100)
    assert get_preset("tiny-llama").replace(dim=128).head_dim == 32  # the preset's explicit head_dim
    assert ModelConfig(dim=64, n_heads=4).replace(dim=128, head_dim=8).head_dim == 8


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, new_n_heads, expected",
    [(32, 8, 16, 4), (32, 8, 12, 3), (4, 2, 3, 3), (4, 1, 8, 1), (4, 4, 8, 8)],
)
def test_explicit_n_kv_heads_keeps_the_gqa_group_when_it_divides(n_heads, n_kv_heads, new_n_heads, expected):
    c = ModelConfig(dim=96 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads)
    assert c.replace(n_heads=new_n_heads).n_kv_heads == expected


def test_presets_with_their_sizes_rederived_are_unchanged():
    for name in list_presets():
        c = get_preset(name)
        assert c.replace() == c and c.replace(dim=c.dim, n_heads=c.n_heads) == c


def test_a_partial_sub_config_changes_only_its_fields():
    c = get_preset("tiny-llama").replace(rope={"theta": 5e5})
    assert (c.rope.theta, c.rope.scaling, c.rope.factor) == (5e5, "llama3", 4.0)
    moe = get_preset("tiny-llama").replace(moe={"n_experts": 4})  # a dense config gets MoE layers
    assert (moe.moe.n_experts, moe.moe.top_k) == (4, 2)
    assert get_preset("tiny-moe").replace(moe=None).moe is None


# Issue 24, point 3: every field's type is checked, from Python, dicts (JSON, TOML) and replace.


@pytest.mark.parametrize(
    "data, words",
    [
        ({"tie_embeddings": "false"}, ["tie_embeddings", "'false'", "true or false"]),
        ({"rope": 5}, ["rope", "5", "RopeConfig"]),
        ({"moe": "x"}, ["moe", "'x'", "MoEConfig"]),
        ({"mla": [1]}, ["mla", "[1]", "MLAConfig"]),
        ({"norm_eps": "1e-5"}, ["norm_eps", "'1e-5'", "a number"]),
        ({"dim": "64"}, ["dim", "'64'", "an integer"]),
        ({"n_layers": 2.0}, ["n_layers", "2.0", "an integer"]),
        ({"qkv_bias": 1}, ["qkv_bias", "1", "true or false"]),
        ({"head_dim": "16"}, ["head_dim", "'16'", "an integer or null"]),
        ({"dim": True}, ["dim", "True", "an integer"]),
        ({"dimm": 64}, ["'dimm'", "did you mean 'dim'"]),
        ({"rope": {"thetaa": 1.0}}, ["'rope.thetaa'", "did you mean 'rope.theta'"]),
        ({"rope": {"theta": "1e4"}}, ["rope.theta", "'1e4'", "a number"]),
        ({"moe": {"top_k": "2"}}, ["moe.top_k", "'2'", "an integer"]),
        ({"activation": 3}, ["activation=3", "swiglu"]),
    ],
)
def test_wrong_types_are_refused_naming_field_value_and_type(data, words):
    for make in (ModelConfig.from_dict, lambda d: ModelConfig().replace(**d)):
        with pytest.raises(ConfigError) as e:
            make(data)
        for w in words:
            assert w in str(e.value)


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="tie_embeddings: expected true or false, got 'false'"):
        ModelConfig(tie_embeddings="false")
    with pytest.raises(ConfigError, match="rope.theta: expected a number"):
        RopeConfig(theta="big")
    with pytest.raises(ConfigError, match="moe.n_experts: expected an integer"):
        MoEConfig(n_experts=None)


def test_ints_widen_to_float_and_dicts_become_sub_configs():
    c = ModelConfig.from_dict({"norm_eps": 1, "positions": "rope", "rope": {"theta": 500000}, "moe": None})
    assert isinstance(c.norm_eps, float) and isinstance(c.rope, RopeConfig) and c.rope.theta == 500000.0
    assert isinstance(c.rope.theta, float)


def test_train_config_checks_its_fields_and_the_model_overrides():
    from tformer.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"max_steps: expected an integer, got '20' \(str\)"):
        TrainConfig.from_dict({"max_steps": "20"})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"max_step": 20})
    with pytest.raises(ConfigError, match="model.dimm': did you mean 'model.dim'"):
        TrainConfig.from_dict({"model": {"dimm": 64}})
    with pytest.raises(ConfigError, match="model.rope.theta: expected a number"):
        TrainConfig(model={"rope": {"theta": "x"}})
    with pytest.raises(ConfigError, match="data: expected a list of strings"):
        TrainConfig(data="corpus.txt")
    cfg = TrainConfig.from_dict({"lr": 1, "model": {"rope": {"theta": 5e5}}})
    assert cfg.lr == 1.0 and cfg.model == {"rope": {"theta": 5e5}}  # a partial override stays partial
