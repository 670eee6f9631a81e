"""A text's attention weights for every layer and head, rollout, and their heatmaps (PNG).

Shapes: L layers, H query heads, T tokens (queries = keys: one cache-free forward).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tformer.io import atomic_path
from tformer.viz.attention import capture_attention


@torch.no_grad()
def attention_weights(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The exact softmax weights of one sequence: (L, H, T, T) float32 on the CPU, row = query.

    Computed by the reference formula (`capture_attention`) whatever kernels the model would use."""
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as maps:
            model(tokens)
    finally:
        model.train(was_training)
    return torch.stack([m[0].float().cpu() for m in maps])


def rollout(weights: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, arXiv:2005.00928): (L, H, T, T) -> (L, T, T).

    Layer l's row t says how much token t's state after layer l draws on each input token: the
    head-mean of each layer, mixed half and half with the residual (identity), rows renormalised,
    multiplied through the layers."""
    eye = torch.eye(weights.shape[-1])
    out, acc = [], eye
    for layer in weights.mean(dim=1):  # (T, T)
        a = 0.5 * layer + 0.5 * eye
        acc = (a / a.sum(-1, keepdim=True)) @ acc
        out.append(acc)
    return torch.stack(out)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text, with spaces and newlines made visible (· and ⏎)."""
    return [printable(tokenizer.decode([i]).replace(" ", "·")) or f"<{i}>" for i in ids]


def printable(text: str) -> str:
    """`text` with newlines as ⏎ and other control characters as \\xNN escapes."""
    text = text.replace("\n", "⏎")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_axes(ax, labels: list[str], size: float) -> None:
    step = max(1, len(labels) // 48)  # at most ~48 labels an axis stay readable
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)


def _save(fig, png: str | Path) -> Path:
    png = Path(png)
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        _pyplot().close(fig)
    return png


def plot_map(weights: torch.Tensor, labels: list[str], title: str, png: str | Path, inches: float = 6.0,
             dpi: int = 100) -> Path:
    """One (T, T) map as a heatmap (queries down, keys across), `inches` x `inches` at `dpi`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(inches, inches), dpi=dpi)
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=float(weights.max()) or 1.0)
    _label_axes(ax, labels, 7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, png)


def plot_head_grid(layer: torch.Tensor, labels: list[str], title: str, png: str | Path, cell: float = 2.5,
                   dpi: int = 100) -> Path:
    """A layer's heads (H, T, T) side by side, at most 4 a row, each `cell` inches square."""
    plt = _pyplot()
    H = layer.shape[0]
    cols = min(H, 4)
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), dpi=dpi, squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if h < H:
            ax.imshow(layer[h].numpy(), cmap="viridis", vmin=0)
            ax.set_title(f"head {h}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, png)


def write_pngs(weights: torch.Tensor, labels: list[str], out: str | Path, layer: int, head: int) -> list[Path]:
    """One head's map, `layer`'s head grid and its mean over heads, into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_map(weights[layer, head], labels, f"layer {layer}, head {head}", out / f"layer{layer}_head{head}.png"),
        plot_head_grid(weights[layer], labels, f"layer {layer}: every head", out / f"layer{layer}_heads.png"),
        plot_map(weights[layer].mean(0), labels, f"layer {layer}: mean over heads", out / f"layer{layer}_mean.png"),
    ]
