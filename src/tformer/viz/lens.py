"""Logit lens (nostalgebraist 2020): what each layer's residual stream would predict if it were the last.

Each block's output goes through the model's final norm and output head; layer L-1's view is then the
model's own logits. Shapes: L layers, T tokens, k predictions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tformer.viz.maps import _label_axes, _pyplot, _save, printable


@dataclass
class Lens:
    """top_ids / top_probs (L, T, k): each layer's k likeliest next tokens at each position and their
    probabilities; final_prob (L, T): each layer's probability of the model's own (last layer's) top token."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    final_prob: torch.Tensor


@torch.no_grad()
def logit_lens(model: nn.Module, ids: list[int], k: int = 5) -> Lens:
    """The lens of one sequence, from forward hooks on `model.layers` (a decoder: `layers`, `norm`, `output`)."""
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: states.append(out)) for layer in model.layers]
    was_training = model.training
    model.eval()
    try:
        model.hidden(tokens)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    probs = torch.stack([model.output(model.norm(x))[0].float().softmax(-1).cpu() for x in states])  # (L, T, V)
    top_probs, top_ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    final_prob = probs.gather(-1, top_ids[-1, :, :1].expand(probs.shape[0], -1, -1))[..., 0]
    return Lens(top_ids, top_probs, final_prob)


def lens_table(lens: Lens, tokenizer, labels: list[str], positions: list[int] | None = None) -> str:
    """A terminal table: one block per position, one row per layer with its top-k tokens and probabilities."""
    L, T, _ = lens.top_ids.shape
    lines = []
    for t in positions if positions is not None else range(T):
        lines.append(f"position {t}  after {labels[t]!r}")
        for layer in range(L):
            preds = "  ".join(f"{_show(tokenizer, int(i)):>10} {float(p):.3f}"
                              for i, p in zip(lens.top_ids[layer, t], lens.top_probs[layer, t]))
            lines.append(f"  layer {layer:>3}  {preds}")
    return "\n".join(lines)


def _show(tokenizer, i: int) -> str:
    return printable(tokenizer.decode([i]).replace(" ", "·"))


def plot_lens(lens: Lens, tokenizer, labels: list[str], png: str | Path, dpi: int = 100) -> Path:
    """Layers x positions, each cell the layer's top token, coloured by its probability of the final prediction."""
    plt = _pyplot()
    L, T = lens.final_prob.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * T + 2), max(3.0, 0.25 * L + 1.5)), dpi=dpi)
    im = ax.imshow(lens.final_prob.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    if T <= 64:
        for layer in range(L):
            for t in range(T):
                ax.text(t, layer, _show(tokenizer, int(lens.top_ids[layer, t, 0]))[:8], ha="center", va="center",
                        fontsize=6, color="white" if lens.final_prob[layer, t] < 0.6 else "black")
    _label_axes(ax, labels, 7)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: each layer's top next token\ncolour: its probability of the final prediction", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _save(fig, png)
