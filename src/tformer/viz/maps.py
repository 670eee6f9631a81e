"""A text's attention weights for every layer and head, rollout, and their heatmaps (PNG).

Shapes: L layers, H query heads, T tokens (queries = keys: one cache-free forward). Decoders give
causal maps, encoders bidirectional ones (a local layer's zero outside its window). An
encoder-decoder gives three kinds (`seq2seq_weights`): the encoder's self-attention over the S
source tokens, the decoder's causal self-attention over the T target tokens, and cross-attention,
target queries over source keys (T, S).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from tformer.io import atomic_path
from tformer.viz.attention import capture_attention


@torch.no_grad()
def attention_weights(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The exact softmax weights of one sequence: (L, H, T, T) float32 on the CPU, row = query.

    Computed by the reference formula (`capture_attention`) whatever kernels the model would use."""
    if getattr(getattr(model, "config", None), "ssd", None) is not None:
        raise ValueError("the model has SSD layers (ssd), which mix tokens without attention weights: a layer "
                         "by layer map (and its rollout) needs every layer to attend")
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as maps:
            model(tokens)
    finally:
        model.train(was_training)
    return torch.stack([m[0].float().cpu() for m in maps])


@torch.no_grad()
def seq2seq_weights(model: nn.Module, source: list[int], target: list[int]) -> dict[str, torch.Tensor]:
    """An EncoderDecoder's exact softmax weights for one pair, teacher-forced: `target` (T,) is the
    decoder's input (its start token first). Returns float32 CPU tensors, row = query:
    "encoder" (L_enc, H, S, S), "decoder" (L_dec, H, T, T) causal, "cross" (L_dec, H, T, S)."""
    device = next(model.parameters()).device
    stacks = {"encoder": model.enc_layers, "decoder": nn.ModuleList(layer.attn for layer in model.dec_layers),
              "cross": nn.ModuleList(layer.cross for layer in model.dec_layers)}
    was_training = model.training
    model.eval()
    try:
        with ExitStack() as stack:
            maps = {name: stack.enter_context(capture_attention(layers)) for name, layers in stacks.items()}
            model(torch.tensor([source], device=device), torch.tensor([target], device=device))
    finally:
        model.train(was_training)
    return {name: torch.stack([m[0].float().cpu() for m in found]) for name, found in maps.items()}


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


def _label_axes(ax, labels: list[str], size: float, rows: list[str] | None = None) -> None:
    """`labels` across (x), `rows` down (y; default: `labels`), at most ~48 an axis (readable)."""
    for names, set_ticks, turn in ((labels, ax.set_xticks, 90), (labels if rows is None else rows, ax.set_yticks, 0)):
        ticks = list(range(0, len(names), max(1, len(names) // 48)))
        set_ticks(ticks, [names[i] for i in ticks], rotation=turn, fontsize=size)


def _save(fig, png: str | Path) -> Path:
    png = Path(png)
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        _pyplot().close(fig)
    return png


def plot_map(weights: torch.Tensor, labels: list[str], title: str, png: str | Path, inches: float = 6.0,
             dpi: int = 100, queries: list[str] | None = None) -> Path:
    """One (T, S) map as a heatmap (queries down, keys across), `inches` x `inches` at `dpi`;
    `labels` name the keys, `queries` the rows (default: `labels`, a square map)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(inches, inches), dpi=dpi)
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=float(weights.max()) or 1.0, aspect="auto")
    _label_axes(ax, labels, 7, queries)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, png)


def plot_head_grid(layer: torch.Tensor, labels: list[str], title: str, png: str | Path, cell: float = 2.5,
                   dpi: int = 100) -> Path:
    """A layer's heads (H, T, S) side by side, at most 4 a row, each `cell` inches square."""
    plt = _pyplot()
    H = layer.shape[0]
    cols = min(H, 4)
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), dpi=dpi, squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if h < H:
            ax.imshow(layer[h].numpy(), cmap="viridis", vmin=0, aspect="auto")
            ax.set_title(f"head {h}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, png)


def write_pngs(weights: torch.Tensor, labels: list[str], out: str | Path, layer: int, head: int,
               name: str = "", queries: list[str] | None = None) -> list[Path]:
    """One head's map, `layer`'s head grid and its mean over heads, into `out`; weights (L, H, T, S),
    `labels` name the keys and `queries` the rows (default: `labels`). `name` (e.g. "cross")
    prefixes the files ("cross_layer0_head0.png") and titles."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    file, title = (f"{name}_", f"{name} ") if name else ("", "")
    return [
        plot_map(weights[layer, head], labels, f"{title}layer {layer}, head {head}",
                 out / f"{file}layer{layer}_head{head}.png", queries=queries),
        plot_head_grid(weights[layer], labels, f"{title}layer {layer}: every head",
                       out / f"{file}layer{layer}_heads.png"),
        plot_map(weights[layer].mean(0), labels, f"{title}layer {layer}: mean over heads",
                 out / f"{file}layer{layer}_mean.png", queries=queries),
    ]
