"""LoRA (Hu et al. 2021) as a module swap: chosen Linear layers become LoRALinear, in place.

    y = base(x) + dropout(x) @ A^T @ B^T * scale      A (r, in), B (out, r)
    scale = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)

A is Kaiming-uniform (as nn.Linear's default init, and PEFT's), B is zeros: an adapted model
starts equal to its base. The base (nn.Linear, or NF4Linear for QLoRA) is wrapped, not copied,
and frozen; after `apply_lora` only the A and B matrices require grad.

Targets are layer names or name suffixes (`wqkv`, `attn.wo`, `layers.3.ffn.w2`) or groups:
    "attention"   every Linear of a block's attention (wqkv, wo; MLA's wq/wq_a/wq_b/wkv_a/wkv_b, wo), and of
                  an encoder-decoder's cross-attention (wq, wkv, wo)
    "ffn"         the w1/w2/w3 of dense FFNs and MoE shared experts (routed experts are not Linears)
    "all-linear"  every Linear except the output head (as PEFT's "all-linear")
The default is "attention", which for Llama-shaped models is PEFT's attention projections with
q, k and v fused: one rank-r update of the fused wqkv, where PEFT trains one for each of q, k, v.
A tied output head shares its weight with the token embedding and cannot take an adapter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tformer.adapters.nf4 import NF4Linear, nf4_eligible, plain_linear
from tformer.config import ConfigError
from tformer.quantize import is_quantized

HEAD = "output"  # the output projection's name in our models
GROUPS = ("attention", "ffn", "all-linear")
QUANTIZE = ("nf4",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRAConfig:
    """r: rank; alpha: scale numerator; dropout on the adapter's input; targets: names, suffixes
    or groups (module docstring); rslora: scale alpha / sqrt(r) instead of alpha / r;
    quantize: "nf4" for QLoRA (every eligible base Linear in NF4, bf16 compute);
    dtype: the A and B parameters' dtype (float32 as PEFT's default, also for a bf16 base)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    rslora: bool = False
    quantize: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        elif isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.alpha, int) and not isinstance(self.alpha, bool):
            self.alpha = float(self.alpha)
        if isinstance(self.dropout, int) and not isinstance(self.dropout, bool):
            self.dropout = float(self.dropout)
        if not _is(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r={self.r!r}: expected a positive integer (the adapter's rank)")
        if not _is(self.alpha, float):
            raise ConfigError(f"lora.alpha={self.alpha!r}: expected a number")
        if not _is(self.dropout, float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: expected a number in [0, 1)")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"lora.rslora={self.rslora!r}: expected true or false")
        targets_ok = isinstance(self.targets, list) and bool(self.targets)
        if not targets_ok or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"lora.targets={self.targets!r}: expected a non-empty list of layer names or {GROUPS}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"lora.quantize={self.quantize!r} is not supported; choose null or one of {QUANTIZE}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"lora.dtype={self.dtype!r} is not supported; choose one of {list(DTYPES)}")

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
                raise ConfigError(f"unknown LoRAConfig field {key!r}: {hint}")
        return cls(**data)


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


class LoRALinear(nn.Module):
    """`base` (nn.Linear or NF4Linear, frozen, not copied) plus a trainable rank-r update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = lora_scale(r, alpha, rslora)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = self.dropout(x).to(self.lora_a.dtype)
        return y + (F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out, in) in float32: what merging adds to the base weight."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices: what the optimiser trains."""
    return [p for m in lora_layers(model).values() for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_a": (r, in), "<layer>.lora_b": (out, r)}: what an adapter file holds
    (FSDP2-sharded DTensors gathered in full)."""
    out = {}
    for name, m in lora_layers(model).items():
        for key in ("lora_a", "lora_b"):
            t = getattr(m, key).detach()
            out[f"{name}.{key}"] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that `apply_lora` would rebuild this model's adapters from, its targets the
    adapted layers' full names."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters: call apply_lora first")
    kinds = {(m.r, m.alpha, m.rslora, _dropout(m), m.lora_a.dtype, isinstance(m.base, NF4Linear))
             for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError("the model's adapters differ in rank, alpha, dropout, dtype or base: tformer saves one kind")
    r, alpha, rslora, dropout, dtype, nf4 = kinds.pop()
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=sorted(layers), rslora=rslora,
                      quantize="nf4" if nf4 else None, dtype=str(dtype).removeprefix("torch."))


def _dropout(m: LoRALinear) -> float:
    return m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0


def _embedded(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers (full precision or NF4) an adapter may wrap, by full name."""
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, NF4Linear)}


def _in_group(name: str, group: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    if group == "attention":
        return parent.rpartition(".")[2] in ("attn", "cross")
    if group == "ffn":
        return leaf in ("w1", "w2", "w3") and ".ffn." in f".{name}."
    return name != HEAD  # all-linear


def _matches(name: str, target: str) -> bool:
    if target in GROUPS:
        return _in_group(name, target)
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """The full names of the layers `targets` (names, suffixes, groups) select; each must match."""
    if isinstance(targets, str):
        targets = [targets]
    candidates = adaptable_layers(model)
    embedded = _embedded(model)
    names = []
    for target in targets:
        hits = [n for n in candidates if _matches(n, target)]
        if not hits:
            raise ValueError(
                f"LoRA target {target!r} matches no Linear layer; pass layer names or suffixes such as "
                f"{list(candidates)[:3]}, or a group: {list(GROUPS)}"
            )
        for n in hits:
            if id(candidates[n].weight) in embedded:
                if target in GROUPS:
                    continue
                raise ValueError(
                    f"LoRA target {n!r} shares its weight with the token embedding (tie_embeddings): "
                    "a merged adapter would change the embedding too; leave it out of the targets"
                )
            if n not in names:
                names.append(n)
    return names


def quantize_nf4(model: nn.Module) -> list[str]:
    """Swap every Linear of the base except the output head for an NF4Linear, in place; returns
    their names. Layers not a whole number of NF4 blocks stay in full precision."""
    embedded = _embedded(model)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n != HEAD and id(m.weight) not in embedded and nf4_eligible(m)]
    for name in names:
        _replace(model, name, NF4Linear.from_linear(model.get_submodule(name)))
    return names


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **fields) -> nn.Module:
    """Wrap `config.targets` in LoRALinear (quantizing the base to NF4 first for QLoRA) and
    freeze everything but the adapters, in place; returns the model. `fields` build a LoRAConfig
    when none is given: apply_lora(model, r=16, targets="all-linear")."""
    config = config or LoRAConfig(**fields)
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters: merge_lora them first, or start from the base")
    if is_quantized(model):
        raise ValueError(
            "the model is quantized (int8/int4): apply LoRA to the full-precision checkpoint, "
            "with quantize='nf4' for QLoRA"
        )
    names = resolve_targets(model, config.targets)
    if config.quantize == "nf4":
        quantize_nf4(model)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, config.r, config.alpha, config.dropout, config.rslora,
                                         DTYPES[config.dtype]))
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base: each LoRALinear is swapped for the module it wraps
    (no branch in the forward), and put back after. A DPO reference without a second copy."""
    layers = lora_layers(model)
    for name, m in layers.items():
        _replace(model, name, m.base)
    try:
        yield model
    finally:
        for name, m in layers.items():
            _replace(model, name, m)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class MergeReport:
    """layers: the merged LoRA layers; dequantized: NF4 layers made plain again; max_weight_change:
    max |W_merged - W_base| over merged layers (W_base dequantized for QLoRA); max_logit_diff:
    max |logits after - logits before| on the probe tokens (None without a probe)."""

    layers: list[str]
    dequantized: list[str]
    max_weight_change: float
    max_logit_diff: float | None = None


@torch.no_grad()
def merge_lora(model: nn.Module, probe: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> MergeReport:
    """Fold every adapter into its base (W + scale * B @ A) and turn NF4 layers back into plain
    nn.Linear, in place: the model is then a plain model (every parameter requires grad, as
    `tformer.load` returns it) that `tformer.save` writes as an ordinary checkpoint.

    dtype: the merged weights' dtype (default: each base weight's original dtype).
    probe: tokens (B, T) run through the model, in eval mode, before and after the merge.
    """
    layers = lora_layers(model)
    inner = {f"{n}.base" for n in layers}
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear) and n not in inner}
    if not layers and not nf4:
        raise ValueError("the model has no LoRA adapters or NF4 layers to merge")
    before = _logits(model, probe)
    max_change = 0.0
    for name, m in layers.items():
        base = m.base
        w = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.float()
        out_dtype = dtype or (base.orig_dtype if isinstance(base, NF4Linear) else base.weight.dtype)
        merged = (w + m.delta_weight()).to(out_dtype)
        max_change = max(max_change, (merged.float() - w).abs().max().item())
        _replace(model, name, plain_linear(merged, base.bias))
    for name, m in nf4.items():
        _replace(model, name, m.to_linear(dtype))
    model.requires_grad_(True)
    after = _logits(model, probe)
    diff = None if probe is None else (after.float() - before.float()).abs().max().item()
    dequantized = sorted([*nf4, *(n for n, m in layers.items() if isinstance(m.base, NF4Linear))])
    return MergeReport(sorted(layers), dequantized, max_change, diff)


def _logits(model: nn.Module, probe: torch.Tensor | None) -> torch.Tensor | None:
    if probe is None:
        return None
    training = model.training
    model.eval()
    try:
        return model(probe)
    finally:
        model.train(training)
