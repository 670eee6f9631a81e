"""The attention explorer: one self-contained HTML page (inline script and data, no network).

Each map (a layer's head, its head mean, the rollout up to a layer) is quantized to bytes
(round(weight * 255)) and base64-encoded; a causal map is stored as its lower triangle (keys 0..t
for query t), T(T+1)/2 bytes, a bidirectional or cross-attention map whole, T*S bytes. The page
decodes a map only when it is shown; a 1,024-token causal map is 0.5 MB. Heatmaps are drawn on
canvas, one pixel a weight.

Data: a decoder's or encoder's page holds `tokens`, `n_layers`, `n_heads`, `maps` keyed "layer:head",
"layer:mean", "rollout:layer", `causal` (false for an encoder) and the decoder's logit `lens`; an
encoder-decoder's page holds `sequences` ("source", "target": token labels), `stacks` ("encoder",
"decoder", "cross": the sequences of its queries and keys, n_layers, n_heads, causal, rollout) and
`maps` keyed "stack/layer:head" and so on.
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


def quantize(weights: torch.Tensor, causal: bool = True) -> bytes:
    """A (T, S) map -> bytes round(w * 255), row by row: a causal (T, T) map's lower triangle, else every weight."""
    if causal:
        T = weights.shape[-1]
        rows, cols = torch.tril_indices(T, T)
        weights = weights[rows, cols]
    return (weights.reshape(-1).clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()


def dequantize(data: bytes, T: int, S: int | None = None, causal: bool = True) -> torch.Tensor:
    """`quantize`'s bytes -> the (T, S) map they hold (S defaults to T; causal: upper triangle zero)."""
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8).float() / 255
    if not causal:
        return values.reshape(T, T if S is None else S)
    out = torch.zeros(T, T)
    rows, cols = torch.tril_indices(T, T)
    out[rows, cols] = values
    return out


def _maps(weights: torch.Tensor, rollouts: torch.Tensor | None, causal: bool, prefix: str = "") -> dict[str, str]:
    """weights (L, H, T, S), rollouts (L, T, T) or None -> base64 maps keyed prefix + "layer:head",
    "layer:mean", "rollout:layer"."""
    L, H = weights.shape[:2]
    maps = {}
    for layer in range(L):
        for head in range(H):
            maps[f"{prefix}{layer}:{head}"] = quantize(weights[layer, head], causal)
        maps[f"{prefix}{layer}:mean"] = quantize(weights[layer].mean(0), causal)
        if rollouts is not None:
            maps[f"{prefix}rollout:{layer}"] = quantize(rollouts[layer], causal)
    return {key: base64.b64encode(b).decode("ascii") for key, b in maps.items()}


def page_data(weights: torch.Tensor, rollouts: torch.Tensor, labels: list[str], lens: Lens | None = None,
              tokenizer=None, causal: bool = True) -> dict:
    """The page's data: weights (L, H, T, T), rollouts (L, T, T), token labels, the logit lens (a
    decoder's; None for an encoder, whose maps are bidirectional: causal=False)."""
    L, H, T, _ = weights.shape
    data = {"tokens": labels, "n_layers": L, "n_heads": H, "maps": _maps(weights, rollouts, causal)}
    if not causal:
        data["causal"] = False
        data["note"] = "bidirectional attention (an encoder); no logit lens: an encoder predicts no next token"
    if lens is not None:
        data["lens"] = {
            "top": [[[tokenizer.decode([int(i)]) for i in lens.top_ids[layer, t]] for t in range(T)]
                    for layer in range(L)],
            "probs": [[[round(float(p), 4) for p in lens.top_probs[layer, t]] for t in range(T)] for layer in range(L)],
            "final_prob": [[round(float(p), 4) for p in row] for row in lens.final_prob],
        }
    return data


def seq2seq_page_data(weights: dict[str, torch.Tensor], rollouts: dict[str, torch.Tensor], source: list[str],
                      target: list[str]) -> dict:
    """An encoder-decoder's page data: `seq2seq_weights`' maps ("encoder" (L, H, S, S), "decoder"
    (L, H, T, T), "cross" (L, H, T, S)), the rollouts of "encoder" and "decoder", the token labels."""
    shapes = {"encoder": ("source", "source", False), "decoder": ("target", "target", True),
              "cross": ("target", "source", False)}
    data = {"sequences": {"source": source, "target": target}, "stacks": {}, "maps": {}}
    for name, (queries, keys, causal) in shapes.items():
        w, roll = weights[name], rollouts.get(name)
        data["stacks"][name] = {"queries": queries, "keys": keys, "n_layers": w.shape[0], "n_heads": w.shape[1],
                                "causal": causal, "rollout": roll is not None}
        data["maps"].update(_maps(w, roll, causal, f"{name}/"))
    data["note"] = ("target: the decoder's input, its start token first; cross-attention: target queries over "
                    "source keys (no rollout); the decoder's rollout follows its self-attention only")
    return data


def write_page(data: dict, path: str | Path, title: str = "tformer attention") -> Path:
    """The explorer page for `page_data`'s data, written atomically to `path`."""
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no "</script>" inside the script
    html = PAGE.replace("__TITLE__", html_lib.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path
