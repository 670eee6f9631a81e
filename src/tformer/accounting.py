"""Compute and memory per token, from the parameter counts of `tformer.params`.

Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022, appendix B):

    6 N + 12 L H Q T

N: active matmul parameters (`params.active_matmul_params`: the routed experts at top_k/n_experts,
the embedding lookups left out, the output head kept), L layers, H query heads, Q head dim,
T context length. The attention term is 3 (forward + backward) x 2 FLOPs x H T (Q for the
scores q.k + Q for the weighted sum of values) per layer, with no saving for the causal mask.
Latent attention (MLA) scores over d_qk = nope_dim + rope_dim and sums over d_v = v_dim per head,
so the term is written 6 L H T (d_qk + d_v), which is PaLM's 12 L H Q T when d_qk = d_v = Q.

KV cache bytes per token: 2 L Hkv head_dim bytes (a key and a value per kv head per layer); MLA
keeps one kv_rank latent and one rope_dim key per layer, shared by all heads (DeepSeek-V2 §2.1):
L (kv_rank + rope_dim) bytes (nn.kv_cache.LatentCache). A sliding window caps the tokens kept,
not the bytes per token.

Training memory (ZeRO, Rajbhandari et al. 2020, §3.1; every parameter, not only the active):
weights and gradients at `dtype`, AdamW's two fp32 moments (8 B), and, where `dtype` is narrower
than fp32, an fp32 master copy of the weights (4 B): 16 B per parameter either way. tformer's
own loop keeps fp32 weights under bf16 autocast, which is the float32 row: 4 + 4 + 8 = 16 B.
Activations, buffers and allocator slack are not counted.
"""

from __future__ import annotations

from tformer.config import ModelConfig
from tformer.params import active_breakdown, active_matmul_params, format_breakdown, parameter_breakdown, table

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAMW_STATE_BYTES = 2 * 4  # exp_avg and exp_avg_sq, fp32


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """PaLM's attention term 12 L H Q T, as 6 L H T (d_qk + d_v) so MLA fits it too."""
    if config.mla is not None:
        d_qk, d_v = config.mla.nope_dim + config.mla.rope_dim, config.mla.v_dim
    else:
        d_qk = d_v = config.head_dim
    return 6 * config.n_layers * config.n_heads * seq_len * (d_qk + d_v)


def training_flops_per_token(config: ModelConfig, seq_len: int, active: dict[str, int] | None = None) -> int:
    """6 N + attention term (module docstring); `active` is `params.active_breakdown(config)`."""
    active = active if active is not None else active_breakdown(config)
    return 6 * active_matmul_params(config, active) + attention_flops_per_token(config, seq_len)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes the KV cache keeps per token, over all layers, at `dtype`."""
    if config.mla is not None:
        per_layer = config.mla.kv_rank + config.mla.rope_dim
    else:
        per_layer = 2 * config.n_kv_heads * config.head_dim
    return config.n_layers * per_layer * _bytes(dtype)


def training_memory(n_params: int, dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes for weights, gradients, an fp32 master copy (0 at float32) and AdamW states, and total."""
    b = _bytes(dtype)
    memory = {
        "weights": n_params * b,
        "gradients": n_params * b,
        "master_weights": n_params * 4 if b < 4 else 0,
        "adamw_states": n_params * ADAMW_STATE_BYTES,
    }
    memory["total"] = sum(memory.values())
    return memory


def accounting(config: ModelConfig, seq_len: int | None = None, dtype: str = "bfloat16") -> dict:
    """Everything `tformer params` reports, as one JSON-able dict: the component counts at top level
    (as `parameter_breakdown`), then active counts, FLOPs, KV cache and training memory."""
    total = parameter_breakdown(config)
    active = active_breakdown(config, total)
    seq_len = seq_len or config.max_seq_len
    return {
        **total,
        "active": active,
        "active_matmul": active_matmul_params(config, active),
        "seq_len": seq_len,
        "dtype": dtype,
        "training_flops_per_token": training_flops_per_token(config, seq_len, active),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype),
        "training_memory_bytes": training_memory(total["total"], dtype),
    }


def format_accounting(config: ModelConfig, acc: dict, title: str | None = None) -> str:
    """The component table (total and active columns), then FLOPs, KV cache and memory rows."""
    T, dtype, b = acc["seq_len"], acc["dtype"], _bytes(acc["dtype"])
    lines = [format_breakdown(acc, title=title, active=acc["active"] if config.moe is not None else None)]
    if config.moe is not None:
        lines.append("active/token: routed experts at top_k/n_experts, the rest in full, embeddings included")
        lines.append("(Mistral's and Qwen's 'active'); N below leaves the embedding lookup out (DeepSeek's).")
    lines.append("")
    attn = "6·L·H·T·(d_qk+d_v)" if config.mla is not None else "12·L·H·Q·T"
    kv = "L·(kv_rank+rope_dim)" if config.mla is not None else "2·L·Hkv·head_dim"
    mem = acc["training_memory_bytes"]
    rows = [
        ["active matmul params N", f"{acc['active_matmul']:,}", "active minus embedding lookups (DeepSeek's 'active')"],
        ["training FLOPs/token", f"{acc['training_flops_per_token']:.4g}", f"6N + {attn}, T={T:,} (PaLM app. B)"],
        ["KV cache/token", f"{acc['kv_cache_bytes_per_token']:,} B", f"{kv}·{b} B ({dtype})"],
        ["weights", _gib(mem["weights"]), f"total params · {b} B ({dtype})"],
        ["gradients", _gib(mem["gradients"]), f"total params · {b} B ({dtype})"],
        ["fp32 master weights", _gib(mem["master_weights"]), "total params · 4 B, where dtype < fp32"],
        ["AdamW m, v", _gib(mem["adamw_states"]), "total params · 2 · 4 B (fp32)"],
        ["training memory", _gib(mem["total"]), "no activations (ZeRO §3.1: 16 B/param)"],
    ]
    lines += table(["per token / memory", "value", "formula"], rows, rules_before=[3, 7], align="lrl")
    return "\n".join(lines)


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**30:.2f} GiB"
