"""Quantization as a module swap: nn.Linear -> Int8Linear / Int4Linear, chosen from outside the model.

Which layers are swapped follows from (mode, group_size, skip) and the model's structure alone,
so a checkpoint stores only that spec and `apply_spec` rebuilds the same modules on meta:
  - every nn.Linear is quantized with `mode`, except names matched by `skip`;
  - a Linear whose weight is an embedding's (a tied output head) is never quantized: the
    matrix is also the token embedding, which stays in full precision;
  - in int4 mode an untied output head is quantized with int8, not int4 (the logits are the
    most sensitive projection; int8 loses almost nothing there);
  - embeddings and norms are not quantized (a decode step reads one embedding row).
"""

from __future__ import annotations

from torch import nn

from tformer.quantize.int4 import Int4Linear, check_group_size
from tformer.quantize.int8 import Int8Linear

MODES = ("int8", "int4")
HEAD = "output"  # the output projection's name in our models
QUANTIZED = (Int8Linear, Int4Linear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def _matches(name: str, patterns) -> bool:
    """`ffn.w2` matches layers.3.ffn.w2; `output` matches only output."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _matches_any(pattern: str, names) -> bool:
    return any(_matches(n, [pattern]) for n in names)


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers (full precision or quantized) whose weight is not an embedding's."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, *QUANTIZED)) and id(m.weight) not in embedded
    }


def plan(model: nn.Module, mode: str, group_size: int = 64, skip=()) -> dict[str, str]:
    """{layer name: "int8" | "int4"} for the layers to swap; validates everything first."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: choose one of {list(MODES)}")
    if isinstance(skip, str):
        skip = [skip]
    all_names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))]
    for p in skip:
        if not _matches_any(p, all_names):
            raise ValueError(f"skip entry {p!r} matches no Linear layer; names look like {all_names[:3]}")
    kinds = {}
    for name, m in _linears(model).items():
        if _matches(name, skip):
            continue
        kind = "int8" if mode == "int4" and name == HEAD else mode
        if kind == "int4":
            check_group_size(m.in_features, group_size, name)
        kinds[name] = kind
    return kinds


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 64, skip=()) -> nn.Module:
    """Swap the model's Linear layers for quantized ones, in place; returns the model.

    mode: "int8" (per-output-channel scales) or "int4" (groups of `group_size` inputs: 32, 64,
    128 or 256). skip: layer names, or name suffixes such as "ffn.w2", kept in full precision;
    an untied output head is quantized too (int8 in both modes; tied heads are always kept: see the
    module docstring), which a decode engine's matvec kernel reads at half the bytes of bf16.
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized: quantize the full-precision checkpoint instead")
    for name, kind in plan(model, mode, group_size, skip).items():
        linear = model.get_submodule(name)
        new = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, group_size)
        _replace(model, name, new)
    return model


def quantization_spec(model: nn.Module) -> dict | None:
    """The JSON-able spec that `apply_spec` turns a fresh model into this one with; None if not quantized."""
    if not is_quantized(model):
        return None
    linears = _linears(model)
    group_sizes = {m.group_size for m in linears.values() if isinstance(m, Int4Linear)}
    if len(group_sizes) > 1:
        raise ValueError(f"int4 layers use different group sizes {sorted(group_sizes)}: tformer stores one")
    spec = {"mode": "int4", "group_size": group_sizes.pop()} if group_sizes else {"mode": "int8"}
    spec["skip"] = sorted(name for name, m in linears.items() if isinstance(m, nn.Linear))
    actual = {name: ("int4" if isinstance(m, Int4Linear) else "int8")
              for name, m in linears.items() if isinstance(m, QUANTIZED)}
    if plan(model, spec["mode"], spec.get("group_size", 64), spec["skip"]) != actual:
        raise ValueError("this mix of quantized layers was not made by quantize_model and cannot be saved")
    return spec


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Swap in empty quantized modules (on the model's device, e.g. meta) per `spec`, for loading."""
    if not isinstance(spec, dict) or spec.get("mode") not in MODES:
        raise ValueError(f"invalid quantization spec {spec!r}: expected {{'mode': 'int8'|'int4', ...}}")
    group_size = spec.get("group_size") or 64
    for name, kind in plan(model, spec["mode"], group_size, spec.get("skip", [])).items():
        linear = model.get_submodule(name)
        w = linear.weight
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        if kind == "int8":
            new = Int8Linear(*args, device=w.device, dtype=w.dtype)
        else:
            new = Int4Linear(*args, group_size=group_size, device=w.device, dtype=w.dtype)
        _replace(model, name, new)
    return model
