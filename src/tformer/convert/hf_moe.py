"""Tensor layouts of the mixture-of-experts HF checkpoints (mixtral, qwen2_moe, deepseek_v3), for
the key maps in `tformer.convert.hf`.

Experts. tformer stacks each expert weight kind: w1 / w3 (E, F, C), w2 (E, C, F). HF files come in
two layouts, and both are read:

    per expert (the Hub's files; what `save_pretrained` writes, transformers 4.x and 5.x):
        mixtral  model.layers.i.block_sparse_moe.experts.e.{w1,w3,w2}.weight        (F, C) / (C, F)
        others   model.layers.i.mlp.experts.e.{gate_proj,up_proj,down_proj}.weight
    fused (transformers 5.x module state, mixtral renamed block_sparse_moe -> mlp):
        model.layers.i.mlp.experts.gate_up_proj (E, 2F, C) = [gate rows; up rows], .down_proj (E, C, F)

Fused tensors are split into the per-expert names before the key map runs (`unfuse_experts`).
Exports are per expert: the layout every reader takes (5.x merges it through its conversion mapping).

DeepSeek RoPE rows. DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... (HF
`rope_interleave`, default true); tformer rotates halves. Permuting the rope rows of the q and
k projections the same way gives the same attention scores, so `rope_rows` reorders the last
qk_rope_head_dim rows of every query head (q_proj / q_b_proj) and of kv_a_proj_with_mqa with
`interleaved_to_half` on load and back on export, which writes rope_interleave=true: DeepSeek's own
layout, which engines that ignore the flag assume.
"""

from __future__ import annotations

import re
import warnings

import torch

from tformer.config import ModelConfig
from tformer.nn.rope import interleaved_to_half

_FUSED = re.compile(r"(.+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL_FUSED_GATE = re.compile(r"(.+)\.mlp\.gate\.weight")


def unfuse_experts(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Fused expert tensors -> the per-expert names of `model_type`'s checkpoints (views, no copies)."""
    if not any(_FUSED.fullmatch(k) for k in tensors):
        return tensors
    mixtral = model_type == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if mixtral else "mlp"
    out = {}
    for key, t in tensors.items():
        if mixtral and (m := _MIXTRAL_FUSED_GATE.fullmatch(key)):
            key = f"{m[1]}.block_sparse_moe.gate.weight"
        if (m := _FUSED.fullmatch(key)) is None:
            out[key] = t
            continue
        parts = {down: t} if m[2] == "down_proj" else dict(zip((gate, up), t.chunk(2, dim=1)))
        for name, stacked in parts.items():
            for e, w in enumerate(stacked.unbind(0)):
                out[f"{m[1]}.{block}.experts.{e}.{name}.weight"] = w
    return out


def drop_mtp_layers(tensors: dict[str, torch.Tensor], hf: dict, n_layers: int, source: str) -> dict:
    """Without DeepSeek-V3's multi-token-prediction layers, stored as model.layers.{n_layers + k}."""
    n_mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
    layer = re.compile(r"model\.layers\.(\d+)\.")

    def is_mtp(key: str) -> bool:
        m = layer.match(key)
        return m is not None and n_layers <= int(m[1]) < n_layers + n_mtp

    kept = {k: v for k, v in tensors.items() if not is_mtp(k)}
    if len(kept) < len(tensors):
        warnings.warn(
            f"{source}: skipped {len(tensors) - len(kept)} tensors of {n_mtp} multi-token-prediction layer(s) "
            f"(model.layers.{n_layers}...): tformer builds the main model only, as HF's DeepseekV3 does",
            stacklevel=3,
        )
    return kept


def rope_rows(t: torch.Tensor, cfg: ModelConfig, query: bool, inverse: bool = False) -> torch.Tensor:
    """An MLA projection's weight (rows, in) or bias (rows,) with its RoPE rows from interleaved pairs to
    rotate-half order (`inverse`: back). Query rows: per head nope_dim, then rope_dim; kv_a rows:
    kv_rank latent, then the rope_dim rows of the key shared by all heads."""
    mla = cfg.mla
    order = interleaved_to_half(torch.arange(mla.rope_dim))  # (R,) ours[j] = theirs[order[j]]
    if inverse:
        order = order.argsort()
    index = torch.arange(t.shape[0])
    if query:
        heads = index.view(-1, mla.nope_dim + mla.rope_dim)  # (H, N + R)
        heads[:, mla.nope_dim :] = heads[:, mla.nope_dim :][:, order]
    else:
        index[mla.kv_rank :] = index[mla.kv_rank :][order]
    return t.index_select(0, index.to(t.device))
