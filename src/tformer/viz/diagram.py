"""An SVG block diagram of one transformer layer, drawn from a ModelConfig.

The diagram reads top to bottom, input to output, with the residual connections on the left:

    pre-norm:  x -> norm -> attention -> (+x) -> norm -> FFN/MoE -> (+) -> out
    post-norm: x -> attention -> (+x) -> norm -> FFN/MoE -> (+) -> norm -> out

Boxes name the attention kind (MHA, GQA, MQA, MLA; sliding window), the positions (RoPE inside
attention, ALiBi on the scores, learned or sinusoidal added before the first layer), the norm and
the FFN or mixture of experts. Plain SVG text, no layout engine: a column of boxes at fixed steps.
"""

from __future__ import annotations

from html import escape

from tformer.config import ModelConfig

WIDTH, BOX_W, BOX_H, STEP, X0 = 520, 340, 46, 70, 120
COLOURS = {"norm": "#fde68a", "attn": "#bfdbfe", "ffn": "#bbf7d0", "moe": "#fbcfe8", "io": "#e5e7eb"}


def attention_kind(config: ModelConfig) -> str:
    """"MLA", "MHA" (n_kv_heads = n_heads), "MQA" (one kv head) or "GQA"."""
    if config.mla is not None:
        return "MLA"
    if config.n_kv_heads == config.n_heads:
        return "MHA"
    return "MQA" if config.n_kv_heads == 1 else "GQA"


def layer_diagram(config: ModelConfig) -> str:
    """SVG text of one layer of `config` (the first MoE layer for MoE models)."""
    nodes = _nodes(config)
    height = 40 + STEP * len(nodes) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#374151"/></marker></defs>',
             f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-weight="bold">{escape(_title(config))}</text>']
    ys = [40 + STEP * i for i in range(len(nodes))]
    for (kind, label, note), y in zip(nodes, ys):
        parts.append(_node(kind, label, note, y))
    cx = X0 + BOX_W / 2
    for (a, y0), (b, y1) in zip(zip(nodes, ys), zip(nodes[1:], ys[1:])):
        bottom = y0 + BOX_H / 2 + 13 if a[0] == "add" else y0 + BOX_H
        top = y1 + BOX_H / 2 - 13 if b[0] == "add" else y1
        parts.append(_arrow(cx, bottom, cx, top))
    parts += _residuals(nodes, ys, config.norm_placement == "post")
    parts.append("</svg>")
    return "\n".join(parts)


def _title(config: ModelConfig) -> str:
    return (f"one of {config.n_layers} layers: dim {config.dim}, {config.norm_placement}-norm, "
            f"positions {config.positions}")


def _nodes(config: ModelConfig) -> list[tuple[str, str, str]]:
    """(kind, label, note) per row, top to bottom; kind "add" is a residual sum."""
    norm = ("norm", "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm", f"eps {config.norm_eps:g}")
    positions = {"learned": "learned positions added to the embeddings",
                 "sinusoidal": "sinusoidal positions added to the embeddings"}.get(config.positions, "")
    x = ("io", "x (residual stream)", positions)
    out = ("io", "to the next layer", "")
    attn, ffn, add = _attention(config), _ffn(config), ("add", "+", "")
    if config.norm_placement == "post":
        return [x, attn, add, norm, ffn, add, norm, out]
    return [x, norm, attn, add, norm, ffn, add, out]


def _attention(config: ModelConfig) -> tuple[str, str, str]:
    kind = attention_kind(config)
    names = {"MHA": "multi-head", "GQA": "grouped-query", "MQA": "multi-query", "MLA": "multi-head latent"}
    label = f"{kind}: {names[kind]} attention"
    if config.mla is not None:
        m = config.mla
        note = f"{config.n_heads} heads, kv latent {m.kv_rank} + rope key {m.rope_dim}"
    elif kind == "MHA":
        note = f"{config.n_heads} heads x {config.head_dim}"
    else:
        note = f"{config.n_heads} query / {config.n_kv_heads} kv heads x {config.head_dim}"
    extras = {"rope": f"RoPE θ={config.rope.theta:g}", "alibi": "ALiBi bias"}.get(config.positions)
    window = f"window {config.sliding_window}" if config.sliding_window else None
    note = ", ".join(filter(None, [note, extras, window]))
    return "attn", label, note


def _ffn(config: ModelConfig) -> tuple[str, str, str]:
    act = {"swiglu": "SwiGLU", "geglu": "GeGLU"}.get(config.activation, config.activation)
    if config.moe is None:
        return "ffn", f"FFN ({act})", f"{config.dim} -> {config.ffn_dim} -> {config.dim}"
    m = config.moe
    width = m.expert_dim or config.ffn_dim
    shared = f" + {m.n_shared_experts} shared" if m.n_shared_experts else ""
    dense = {0: "", 1: "; layer 0 dense"}.get(m.first_dense, f"; layers 0-{m.first_dense - 1} dense")
    every = f"; every {m.interval} layers" if m.interval > 1 else ""
    label = f"MoE: top-{m.top_k} of {m.n_experts} experts{shared}"
    return "moe", label, f"{act} experts of width {width}{dense}{every}"


def _node(kind: str, label: str, note: str, y: float) -> str:
    cx = X0 + BOX_W / 2
    if kind == "add":
        return (f'<g class="add"><circle cx="{cx}" cy="{y + BOX_H / 2}" r="13" fill="white" stroke="#374151"/>'
                f'<text x="{cx}" y="{y + BOX_H / 2 + 5}" text-anchor="middle" font-size="18">+</text></g>')
    text_y = y + (19 if note else 28)
    lines = [f'<g class="{kind}"><rect x="{X0}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
             f'fill="{COLOURS[kind]}" stroke="#374151"/>',
             f'<text x="{cx}" y="{text_y}" text-anchor="middle" font-weight="bold">{escape(label)}</text>']
    if note:
        lines.append(f'<text x="{cx}" y="{y + 36}" text-anchor="middle" font-size="11">{escape(note)}</text>')
    return "".join(lines) + "</g>"


def _arrow(x0: float, y0: float, x1: float, y1: float) -> str:
    return (f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#374151" stroke-width="1.5" '
            f'marker-end="url(#arrow)"/>')


def _residuals(nodes: list[tuple[str, str, str]], ys: list[float], post: bool) -> list[str]:
    """A dashed skip line into each sum from its residual source, around the left: the layer input, then
    the first sum (pre-norm) or the norm after it (post-norm)."""
    lines, source, x, cx = [], 0, X0 - 40, X0 + BOX_W / 2
    for i, (kind, _, _) in enumerate(nodes):
        if kind == "add":
            y0, y1 = ys[source] + BOX_H / 2, ys[i] + BOX_H / 2
            start = cx - 13 if nodes[source][0] == "add" else X0
            lines.append(f'<path class="residual" d="M{start},{y0} H{x} V{y1} H{cx - 13}" fill="none" '
                         f'stroke="#6b7280" stroke-width="1.5" stroke-dasharray="5,3" marker-end="url(#arrow)"/>')
            source = i + 1 if post else i
    return lines
