"""QLoRA: NF4 base weights (torchao's NF4Tensor, double-quantized scales) under LoRA adapters: the
NF4 error bound, the forward against the full-precision one, training, the adapter round trip
onto a full-precision base, and the merge into the dequantized weights with its report."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

import tformer  # noqa: E402
from tformer.adapters import (  # noqa: E402
    LoRAConfig, LoRALinear, NF4Linear, apply_lora, base_fingerprint, load_adapter, lora_parameters, merge_lora,
    save_adapter,
)
from tformer.adapters.nf4 import scaler_block_size  # noqa: E402
from tformer.models.build import build_model  # noqa: E402

from .conftest import tiny_config  # noqa: E402

TOKENS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
QLORA = LoRAConfig(r=4, alpha=8, targets=["all-linear"], quantize="nf4")


def base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config()).eval()


def trained_qlora() -> nn.Module:
    model = apply_lora(base(), QLORA)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.05)
    return model


def test_nf4_weight_error_is_within_the_nf4_bound():
    """|w - dequant(w)| <= half the widest gap between NF4 levels times the block's absmax, plus the
    double quantization's error on that absmax and bf16 rounding (QLoRA, Dettmers et al. 2023)."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 576, bias=False)  # SmolLM2's wo: 5184 blocks, not a multiple of 256 scales
    q = NF4Linear.from_linear(linear)
    nf4 = q.weight
    assert (nf4.block_size, nf4.scaler_block_size) == (64, 216) and nf4.quantized_scalers.dtype == torch.int8
    assert nf4.quantized_data.numel() == linear.weight.numel() // 2  # two 4-bit codes a byte
    w = linear.weight.detach().reshape(-1, 64)
    absmax = w.abs().amax(dim=1, keepdim=True)
    scales = nf4.dequantize_scalers(nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_block_size)
    half_gap = (nf4.nf4.float().diff().max() / 2).item()  # (-0.6962 - -1) / 2: the widest gap is at -1
    assert 0.15 < half_gap < 0.153
    bound = half_gap * absmax + (scales.float()[:, None] - absmax).abs() + 2**-8 * absmax
    error = (w - q.dequantize(torch.float32).reshape(-1, 64)).abs()
    assert (error <= bound).all() and error.max() > 0.5 * half_gap * absmax.min()
    # the forward is the dequantized weight's, in bf16 (QLoRA's compute dtype)
    x = torch.randn(3, 576)
    expected = F.linear(x.bfloat16(), q.dequantize(torch.bfloat16)).float()
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("numel, block", [(576 * 960, 240), (64 * 256, 256), (48 * 80, 60), (64 * 67 * 5, 67)])
def test_scaler_block_divides_the_blocks(numel, block):
    assert scaler_block_size(numel) == block and (numel // 64) % block == 0


def test_qlora_forward_is_close_to_the_full_precision_forward():
    full = base()
    expected = full(TOKENS)
    model = apply_lora(base(), QLORA)
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 10 and all(n.endswith(".base") for n in nf4)  # every Linear but the head
    assert type(model.output) is nn.Linear
    logits = model(TOKENS)
    relative = ((logits - expected).norm() / expected.norm()).item()
    assert 0 < relative < 0.15  # ~9% weight error a layer (the bound above), much of it averaging out


def test_qlora_trains_only_the_adapters():
    model = apply_lora(base(), QLORA)
    frozen = [m.weight.quantized_data.clone() for m in model.modules() if isinstance(m, NF4Linear)]
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = [m.weight.quantized_data for m in model.modules() if isinstance(m, NF4Linear)]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_nf4_layers_move_cast_and_copy_as_modules():
    """model.to(device) moves NF4 weights, a dtype cast keeps them NF4 (only the adapters and the
    rest of the model are cast), deepcopy gives its own NF4 storage: what a trainer or a DPO
    reference copy does to a model."""
    model = trained_qlora()
    expected = model(TOKENS)
    nf4 = model.layers[0].ffn.w1.base
    model.to("cpu")
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=0)
    copy_ = copy.deepcopy(model)
    torch.testing.assert_close(copy_(TOKENS), expected, rtol=0, atol=0)
    copied = copy_.layers[0].ffn.w1.base.weight
    assert copied.quantized_data.data_ptr() != nf4.weight.quantized_data.data_ptr()
    assert {id(p) for p in lora_parameters(copy_)} == {id(p) for p in copy_.parameters() if p.requires_grad}
    model.to(torch.bfloat16)
    assert isinstance(nf4.weight, type(copied)) and nf4.orig_dtype == torch.bfloat16
    assert model.layers[0].ffn.w1.lora_a.dtype == torch.bfloat16
    torch.testing.assert_close(model(TOKENS).float(), expected, rtol=0.02, atol=0.02)


def test_qlora_adapter_loads_onto_the_full_precision_base(tmp_path):
    model = trained_qlora()
    assert base_fingerprint(model) == base_fingerprint(base())  # NF4 layers keep their source's digest
    expected = model(TOKENS)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(base(), tmp_path / "adapter")  # quantizes the base as in training
    assert isinstance(reloaded.layers[0].attn.wqkv.base, NF4Linear)
    torch.testing.assert_close(reloaded(TOKENS), expected, rtol=0, atol=0)
    with pytest.raises(tformer.io.CheckpointError, match="trained on another base"):
        load_adapter(base(seed=1), tmp_path / "adapter")
    full = load_adapter(base(), tmp_path / "adapter", quantize=False)  # onto the full-precision weights
    assert type(full.layers[0].attn.wqkv.base) is nn.Linear and type(full.layers[0].ffn.w1) is LoRALinear


def test_qlora_merge_into_the_dequantized_weights_is_reported_and_small(tmp_path):
    model = trained_qlora()
    dequantized = {n: m.base.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    deltas = {n: m.delta_weight() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    unmerged = model(TOKENS)
    report = merge_lora(model, probe=TOKENS)
    assert len(report.layers) == 10 and len(report.dequantized) == 10
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in model.modules())
    for name, w in dequantized.items():  # merged into the dequantized NF4 weight, not the original
        torch.testing.assert_close(model.get_submodule(name).weight, w + deltas[name])
    biggest = max(d.abs().max().item() for d in deltas.values())
    assert report.max_weight_change == pytest.approx(biggest, rel=1e-5) and biggest > 1e-2
    merged = model(TOKENS)
    assert report.max_logit_diff == (merged - unmerged).abs().max().item()
    # the unmerged model computes its base in bf16, the merged one in fp32: bf16 rounding only
    assert report.max_logit_diff < 0.05 * unmerged.abs().max().item()

    with pytest.warns(UserWarning, match="no tokenizer.json"):
        tformer.save(model, tmp_path / "merged")
    torch.testing.assert_close(tformer.load(tmp_path / "merged")(TOKENS), merged, rtol=0, atol=0)


@pytest.mark.slow
def test_qlora_layer_compiles_without_graph_breaks():
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(64, 128)), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_b, std=0.05)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-2, atol=1e-2)
    compiled(x).sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None
