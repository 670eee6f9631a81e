"""LoRA as a module swap: zero-init equality, only adapters train, targets, save/load apart from the
base (refusing another base), and merge = adapted model, saved as a plain tformer checkpoint."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tformer
from tformer.adapters import (
    AdapterError, LoRAConfig, LoRALinear, adapters_disabled, apply_lora, base_fingerprint, load_adapter,
    lora_parameters, merge_lora, resolve_targets, save_adapter,
)
from tformer.config import ConfigError, MLAConfig
from tformer.models.build import build_model
from tformer.presets import get_preset

from .conftest import tiny_config

TOKENS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def base(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def randomize_adapters(model: nn.Module, std: float = 0.05) -> None:
    """Nonzero B (and A) so an adapter changes the model."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, std)


def test_zero_init_adapted_model_equals_its_base():
    model = base()
    expected = model(TOKENS)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["all-linear"]))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 5  # wqkv, wo, w1, w2, w3 in each of 2 layers
    for m in layers:
        assert torch.count_nonzero(m.lora_b) == 0
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert m.lora_a.abs().max() <= bound and m.lora_a.abs().max() > bound / 2
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=0)


def test_forward_is_base_plus_scaled_low_rank_update():
    for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        model = base()
        linear = model.layers[0].attn.wqkv
        apply_lora(model, LoRAConfig(r=4, alpha=16, rslora=rslora, targets=["layers.0.attn.wqkv"]))
        lora = model.layers[0].attn.wqkv
        assert lora.base is linear and lora.scale == scale  # wrapped, not copied
        randomize_adapters(model)
        x = torch.randn(3, 5, 48)
        expected = linear(x) + x @ lora.lora_a.T @ lora.lora_b.T * scale
        torch.testing.assert_close(lora(x), expected)


def test_only_adapters_train_and_the_loss_goes_down():
    model = base()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, targets=["attention", "ffn"], dropout=0.1))
    params = lora_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))
    ]
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    before = {id(p): p.detach().clone() for p in params}
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, value in model.state_dict().items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        assert torch.equal(value, frozen[name.replace(".base.", ".")]), name
    assert all(not torch.equal(p, before[id(p)]) for p in params)  # every A and every B moved


def test_adapters_disabled_gives_the_base_back_inside_the_block():
    model = base()
    expected = model(TOKENS)
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    randomize_adapters(model)
    adapted = model(TOKENS)
    with adapters_disabled(model) as reference:
        torch.testing.assert_close(reference(TOKENS), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(TOKENS), adapted, rtol=0, atol=0)


def test_targets_by_group_suffix_and_name():
    model = base()
    assert resolve_targets(model, "attention") == [f"layers.{i}.attn.{n}" for i in (0, 1) for n in ("wqkv", "wo")]
    assert resolve_targets(model, ["ffn.w2"]) == ["layers.0.ffn.w2", "layers.1.ffn.w2"]
    assert resolve_targets(model, "layers.1.ffn.w3") == ["layers.1.ffn.w3"]
    assert "output" in resolve_targets(model, "output")  # an untied head may be adapted by name
    assert "output" not in resolve_targets(model, "all-linear")
    with pytest.raises(ValueError, match="'q_proj' matches no Linear layer"):
        resolve_targets(model, "q_proj")
    tied = base(tie_embeddings=True)
    with pytest.raises(ValueError, match="shares its weight with the token embedding"):
        resolve_targets(tied, "output")
    mla = base(mla=MLAConfig(q_rank=16, kv_rank=16, nope_dim=8, rope_dim=4, v_dim=8))
    assert resolve_targets(mla, "attention")[:5] == [
        f"layers.0.attn.{n}" for n in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
    ]


def test_config_is_validated():
    with pytest.raises(ConfigError, match="lora.r=0"):
        LoRAConfig(r=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="lora.quantize='int4'"):
        LoRAConfig(quantize="int4")
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        LoRAConfig.from_dict({"alpah": 8})
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(apply_lora(base()), LoRAConfig())


def test_adapter_saves_apart_from_the_base_and_loads_onto_it(tmp_path):
    model = base()
    fingerprint = base_fingerprint(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["attention", "ffn.w2"]))
    assert base_fingerprint(model) == fingerprint  # the adapters are not part of the base
    randomize_adapters(model)
    expected = model(TOKENS)
    save_adapter(model, tmp_path / "adapter", base="somewhere/base-ckpt")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["alpha"] == 8 and meta["scale"] == 2
    assert meta["lora"]["targets"] == sorted(resolve_targets(base(), ["attention", "ffn.w2"]))
    assert meta["base"]["fingerprint"] == fingerprint and meta["base"]["path"].endswith("somewhere/base-ckpt")
    assert meta["base"]["config"]["dim"] == 48

    fresh = load_adapter(base(), tmp_path / "adapter")
    torch.testing.assert_close(fresh(TOKENS), expected, rtol=0, atol=0)
    save_adapter(torch.compile(model), tmp_path / "from-compiled")  # a trainer's compiled model: same names
    assert json.loads((tmp_path / "from-compiled" / "adapter_config.json").read_text())["lora"] == meta["lora"]
    assert all(p.requires_grad == n.endswith(("lora_a", "lora_b")) for n, p in fresh.named_parameters())
    # the same checkpoint read in bf16 is the same base
    load_adapter(base().to(torch.bfloat16), tmp_path / "adapter")


def test_adapter_refuses_another_base(tmp_path):
    model = apply_lora(base(), LoRAConfig(r=4))
    save_adapter(model, tmp_path / "adapter")
    other = base(seed=1)
    with pytest.raises(AdapterError, match="trained on another base .the configs agree but the weights differ"):
        load_adapter(other, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # refused before touching it
    load_adapter(other, tmp_path / "adapter", check_base=False)  # the user's explicit override

    wider = base(n_kv_heads=6)  # wqkv is (144, 48) here, (80, 48) there
    with pytest.raises(AdapterError, match=r"lora_b has shape \(80, 4\) but this base needs \(144, 4\)"):
        load_adapter(wider, tmp_path / "adapter")
    deeper = base(n_layers=3, dim=48)
    with pytest.raises(AdapterError, match="config fields differ: n_layers: 2 there, 3 here"):
        load_adapter(deeper, tmp_path / "adapter")
    mla = base(mla=MLAConfig(q_rank=16, kv_rank=16, nope_dim=8, rope_dim=4, v_dim=8))
    with pytest.raises(AdapterError, match="adapts layer 'layers.0.attn.wqkv', which this model does not have"):
        load_adapter(mla, tmp_path / "adapter")


def test_merged_model_equals_the_adapted_model_and_saves_as_a_plain_checkpoint(tmp_path):
    model = base()
    plain_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["all-linear", "output"]))
    randomize_adapters(model)
    adapted = model(TOKENS)
    report = merge_lora(model, probe=TOKENS)
    assert len(report.layers) == 11 and report.dequantized == []
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == plain_keys and all(p.requires_grad for p in model.parameters())
    merged = model(TOKENS)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert report.max_logit_diff == (merged - adapted).abs().max().item() and report.max_logit_diff < 1e-5
    assert report.max_weight_change > 1e-3  # the adapters did change the weights

    with pytest.warns(UserWarning, match="no tokenizer.json"):
        tformer.save(model, tmp_path / "merged")
    torch.testing.assert_close(tformer.load(tmp_path / "merged")(TOKENS), merged, rtol=0, atol=0)


def test_merge_of_a_loaded_adapter_on_a_preset_with_tied_embeddings(tmp_path):
    """tiny-llama (tied head, explicit head_dim): the README's path, through checkpoints."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama"))
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        tformer.save(model, tmp_path / "base")
    model = apply_lora(tformer.load(tmp_path / "base"), LoRAConfig(targets="all-linear"))
    randomize_adapters(model)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    adapted = model(tokens)
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base")
    reloaded = load_adapter(tformer.load(tmp_path / "base"), tmp_path / "adapter")
    merge_lora(reloaded)
    torch.testing.assert_close(reloaded(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert reloaded.output.weight is reloaded.tok_emb.weight


def test_digest_samples_the_last_value_of_a_tensor_past_float32s_exact_integers():
    """2**24 + 4 values (SmolLM2's 49152 x 576 embedding is larger): float32 sample positions would
    round the last one up to n, past the end."""
    from tformer.adapters import tensor_digest

    t = torch.zeros(2**24 + 4, dtype=torch.uint8)
    zeros = tensor_digest(t)
    t[-1] = 7
    assert tensor_digest(t) != zeros
