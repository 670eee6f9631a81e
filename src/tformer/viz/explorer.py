"""The attention explorer: one self-contained HTML page (inline script and data, no network).

Each map (a layer's head, its head mean, the rollout up to a layer) is stored as its lower triangle
(causal: keys 0..t for query t), quantized to bytes (round(weight * 255)) and base64-encoded, so a
page of T tokens holds T(T+1)/2 bytes a map and decodes one only when it is shown; a 1,024-token map
is 0.5 MB. Heatmaps are drawn on canvas, one pixel a weight.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
from pathlib import Path

import torch

from tformer.io import atomic_path
from tformer.viz.explorer_page import PAGE
from tformer.viz.lens import Lens


def quantize(weights: torch.Tensor) -> bytes:
    """A (T, T) causal map -> its lower triangle, row by row, as bytes round(w * 255)."""
    T = weights.shape[-1]
    rows, cols = torch.tril_indices(T, T)
    return (weights[rows, cols].clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()


def dequantize(data: bytes, T: int) -> torch.Tensor:
    """`quantize`'s bytes -> the (T, T) map they hold (upper triangle zero)."""
    out = torch.zeros(T, T)
    rows, cols = torch.tril_indices(T, T)
    out[rows, cols] = torch.frombuffer(bytearray(data), dtype=torch.uint8).float() / 255
    return out


def page_data(weights: torch.Tensor, rollouts: torch.Tensor, labels: list[str], lens: Lens | None = None,
              tokenizer=None) -> dict:
    """The page's data: weights (L, H, T, T), rollouts (L, T, T), token labels, the logit lens."""
    L, H, T, _ = weights.shape
    maps = {}
    for layer in range(L):
        for head in range(H):
            maps[f"{layer}:{head}"] = quantize(weights[layer, head])
        maps[f"{layer}:mean"] = quantize(weights[layer].mean(0))
        maps[f"rollout:{layer}"] = quantize(rollouts[layer])
    data = {"tokens": labels, "n_layers": L, "n_heads": H,
            "maps": {key: base64.b64encode(b).decode("ascii") for key, b in maps.items()}}
    if lens is not None:
        data["lens"] = {
            "top": [[[tokenizer.decode([int(i)]) for i in lens.top_ids[layer, t]] for t in range(T)]
                    for layer in range(L)],
            "probs": [[[round(float(p), 4) for p in lens.top_probs[layer, t]] for t in range(T)] for layer in range(L)],
            "final_prob": [[round(float(p), 4) for p in row] for row in lens.final_prob],
        }
    return data


def write_page(data: dict, path: str | Path, title: str = "tformer attention") -> Path:
    """The explorer page for `page_data`'s data, written atomically to `path`."""
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no "</script>" inside the script
    html = PAGE.replace("__TITLE__", html_lib.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path
