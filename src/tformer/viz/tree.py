"""A model's module tree as text: each module's class and its own parameters' shapes, with runs of
identical blocks folded into one entry ("layers.1-11  Block  x11").

    Decoder  124,439,808 params
      tok_emb  Embedding  weight (50257, 768)
      layers  ModuleList
        layers.0-11  Block  x12
          attn_norm  LayerNorm  weight (768,)  bias (768,)
          ...
"""

from __future__ import annotations

from torch import nn


def module_tree(model: nn.Module) -> list[str]:
    """Lines of the tree of `model` (any device, meta included)."""
    total = sum(p.numel() for p in model.parameters())
    return [f"{type(model).__name__}  {total:,} params", *_children(model, indent=1)]


def _children(module: nn.Module, indent: int) -> list[str]:
    lines = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            lines.append(_line(indent, name, child))
            lines += _folded(name, child, indent + 1)
        else:
            lines.append(_line(indent, name, child))
            lines += _children(child, indent + 1)
    return lines


def _folded(prefix: str, modules: nn.ModuleList, indent: int) -> list[str]:
    """Runs of consecutive identical modules (same class, names and shapes) as one entry each."""
    lines, start = [], 0
    items = list(modules)
    for i in range(1, len(items) + 1):
        if i == len(items) or _signature(items[i]) != _signature(items[start]):
            span = f"{start}" if i - start == 1 else f"{start}-{i - 1}"
            count = f"  x{i - start}" if i - start > 1 else ""
            lines.append(_line(indent, f"{prefix}.{span}", items[start]) + count)
            lines += _children(items[start], indent + 1)
            start = i
    return lines


def _signature(module: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in module.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in module.named_parameters())


def _line(indent: int, name: str, module: nn.Module) -> str:
    shapes = "".join(f"  {n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False))
    return f"{'  ' * indent}{name}  {type(module).__name__}{shapes}"
