"""Parameter, FLOP and memory accounting of a model config, without allocating weights.

Parameters. The model is built on the meta device (no memory is allocated, so a 671B config
costs nothing) and its named parameters are classified by our module names, so the counts are
those of the code. A tied output matrix is the token embedding: `named_parameters` yields it
once, under `tok_emb`, so `output` counts 0. Components: embeddings (token + learned positions),
attention (incl. MLA's latent norms), ssd (Mamba-2 mixers: projections, conv, A, dt bias, D, gated
norm), ffn (the dense FFNs), routed_experts, shared_experts (incl. Qwen2-MoE's shared-expert gate),
router, norms (the blocks' and the final norm), output. An
encoder's segment embeddings count as embeddings, its embedding norm as norms and its [CLS]
pooler (a dense layer) as ffn. Dense
models have 0 in the three MoE rows.

Active parameters per token: a token runs top_k of n_experts routed experts in each MoE layer,
so routed_experts count top_k / n_experts of their total; everything else counts fully,
embeddings included. That is how Mistral (Mixtral 12.9B of 46.7B) and Qwen (Qwen1.5-MoE 2.7B of
14.3B) state "active"; DeepSeek leaves the embedding lookup out (V2-Lite 2.4B of 15.7B, V3 37B
of 671B): that figure is `active_matmul_params`, the N of the 6N training FLOPs.

Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022, appendix B):

    6 N + 12 L H Q T

N: active matmul parameters (the routed experts at top_k/n_experts, the embedding lookups left
out, the output head kept), L layers, H query heads, Q head dim, T context length. The attention
term is 3 (forward + backward) x 2 FLOPs x H T (Q for the scores q.k + Q for the weighted sum of
values) per layer, with no saving for the causal mask. Latent attention (MLA) scores over
d_qk = nope_dim + rope_dim and sums over d_v = v_dim per head, so the term is written
6 L H T (d_qk + d_v), which is PaLM's 12 L H Q T when d_qk = d_v = Q. Model FLOP utilisation
divides these FLOPs by the device's peak (`peak_flops`). Only attention layers take the attention
term; an SSD layer (Mamba-2, tformer.nn.ssd) takes its chunked form's instead, with chunks of
Q = min(chunk, T) tokens, H heads of P dims, G groups of N state dims:

    6 L_ssd (H Q P + G Q N + 2 H P N)

(per token: scores C.B over the chunk per group, their weighted sum of values per head, the
token's share of its chunk's state, and the state read back; no saving for the causal mask).
Its conv, projections, A, dt bias and D are parameters, in 6 N.

Approximate attention (tformer.nn.approx) replaces 12 L H Q T by its own terms, linear in T,
6 L x (multiply-adds per token), with m features, r rank, C tokens a chunk (`performer_chunk`;
Linformer's C = 64), counted as the code computes them (the masked within-chunk products in full):

    Performer  causal  H (C (m + Q) + 2 m Q) + Hkv (2 m Q + T m Q / C^2)   bidirectional  2 m Q (H + Hkv)
    Linformer  causal  H (2 r Q + 2 C (Q + r)) + 2 Hkv r Q                 bidirectional  2 r Q (H + Hkv)

KV cache bytes per token: 2 L Hkv head_dim bytes (a key and a value per kv head per layer); MLA
keeps one kv_rank latent and one rope_dim key per layer, shared by all heads (DeepSeek-V2 §2.1):
L (kv_rank + rope_dim) bytes (nn.kv_cache.LatentCache). A sliding window caps the tokens kept,
not the bytes per token. SSD layers keep no per-token cache but a constant state per sequence
(nn.ssd.SSDCache): H P N fp32 values and the conv's last W-1 inputs (E + 2 G N channels) each.
Approximate attention keeps no KV cache either: a Performer layer keeps fp32 S (m x Q), z (m) and
a maximum per kv head, a Linformer layer fp32 K~ and V~ (r x Q each) per kv head and a count.

Training memory (ZeRO, Rajbhandari et al. 2020, §3.1; every parameter, not only the active):
weights and gradients at `dtype`, AdamW's two fp32 moments (8 B), and, where `dtype` is narrower
than fp32, an fp32 master copy of the weights (4 B): 16 B per parameter either way. tformer's
own loop keeps fp32 weights under bf16 autocast, which is the float32 row: 4 + 4 + 8 = 16 B.
Activations, buffers and allocator slack are not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.build import build_model

COMPONENTS = ("embeddings", "attention", "ssd", "ffn", "routed_experts", "shared_experts", "router", "norms", "output")
MOE_COMPONENTS = ("routed_experts", "shared_experts", "router")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAMW_STATE_BYTES = 2 * 4  # exp_avg and exp_avg_sq, fp32

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' datasheets; first match wins.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16
]

# First name segment -> component, for parameters outside the blocks.
_TOP_LEVEL = {"tok_emb": "embeddings", "pos_emb": "embeddings", "norm": "norms", "output": "output",
              "seg_emb": "embeddings", "emb_norm": "norms", "pooler": "ffn",  # these three: encoders
              "enc_bias": "attention", "dec_bias": "attention", "enc_norm": "norms", "dec_norm": "norms",  # enc-dec
              "rel_bias": "attention"}  # a decoder's T5 relative position bias
# Module name inside a block (layers.{i}.<name>) -> component.
_IN_BLOCK = {"attn": "attention", "ffn": "ffn", "attn_norm": "norms", "ffn_norm": "norms",
             "mixer": "ssd", "mixer_norm": "norms",  # SSD layers (models.blocks.SSDBlock)
             "cross": "attention", "cross_norm": "norms"}  # the last two: encoder-decoders' decoder layers
_STACKS = ("layers", "enc_layers", "dec_layers")
# Module name inside a MoE layer's ffn (layers.{i}.ffn.<name>) -> component; a dense FFN's
# w1/w2/w3 are not listed and stay "ffn".
_IN_MOE = {"experts": "routed_experts", "router": "router", "shared": "shared_experts", "shared_gate": "shared_experts"}


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of a model of `config` by component (see the module docstring) and total."""
    return model_breakdown(build_model(config, device="meta"))


def model_breakdown(model: nn.Module) -> dict[str, int]:
    """`parameter_breakdown` of a built Decoder (any device); shared parameters count once."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # deduplicates tied parameters
        counts[classify(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def active_breakdown(config: ModelConfig, breakdown: dict[str, int] | None = None) -> dict[str, int]:
    """Parameters one token uses, by component: `breakdown` (default: `parameter_breakdown(config)`)
    with the routed experts scaled by top_k / n_experts; embeddings count fully."""
    total = breakdown if breakdown is not None else parameter_breakdown(config)
    active = {k: total[k] for k in COMPONENTS}
    if config.moe is not None:
        routed, m = total["routed_experts"], config.moe
        if routed % m.n_experts:
            raise ValueError(
                f"routed_experts={routed:,} is not a multiple of moe.n_experts={m.n_experts}: "
                "a parameter outside the experts is classified as routed (see tformer.accounting._IN_MOE)"
            )
        active["routed_experts"] = routed // m.n_experts * m.top_k
    active["total"] = sum(active[k] for k in COMPONENTS)
    return active


def active_matmul_params(config: ModelConfig, active: dict[str, int]) -> int:
    """Active parameters without the embedding lookups (token and learned positions): those a
    token multiplies with, the N of 6N. A tied output matrix is kept: it is the head's matmul."""
    lookups = active["embeddings"] - (config.vocab_size * config.dim if config.tie_embeddings else 0)
    return active["total"] - lookups


def classify(name: str) -> str:
    """The component of a Decoder parameter name, e.g. "layers.3.attn.wqkv.weight" -> "attention",
    "layers.3.ffn.experts.w1" -> "routed_experts"."""
    parts = name.split(".")
    if parts[0] in _STACKS and len(parts) > 2 and parts[2] in _IN_BLOCK:
        component = _IN_BLOCK[parts[2]]
        if component == "ffn" and len(parts) > 3 and parts[3] in _IN_MOE:
            return _IN_MOE[parts[3]]
        return component
    if parts[0] in _TOP_LEVEL:
        return _TOP_LEVEL[parts[0]]
    raise ValueError(
        f"parameter {name!r} belongs to no known component {COMPONENTS}: "
        "add its module name to tformer.accounting._TOP_LEVEL, _IN_BLOCK or _IN_MOE"
    )


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """PaLM's attention term 12 L H Q T, as 6 L H T (d_qk + d_v) so MLA fits it too; an
    approximation's own linear term (module docstring)."""
    if config.attention.approx != "none":
        return 6 * _attention_layers(config) * _approx_macs_per_token(config, seq_len)
    if config.mla is not None:
        d_qk, d_v = config.mla.nope_dim + config.mla.rope_dim, config.mla.v_dim
    else:
        d_qk = d_v = config.head_dim
    return 6 * _attention_layers(config) * config.n_heads * seq_len * (d_qk + d_v)


def _approx_macs_per_token(config: ModelConfig, seq_len: int) -> int:
    from tformer.nn.approx import CHUNK, performer_chunk

    a, H, Hkv, Q, T = config.attention, config.n_heads, config.n_kv_heads, config.head_dim, seq_len
    causal = config.architecture == "decoder"
    if a.approx == "performer":
        m = a.features
        if not causal:
            return 2 * m * Q * (H + Hkv)
        C = performer_chunk(T, m, Q)
        return H * (C * (m + Q) + 2 * m * Q) + Hkv * (2 * m * Q + T * m * Q // C**2)
    r = a.rank
    return H * (2 * r * Q + 2 * CHUNK * (Q + r)) + 2 * Hkv * r * Q if causal else 2 * r * Q * (H + Hkv)


def approx_state_bytes(config: ModelConfig) -> int:
    """Bytes the approximate attention layers keep per sequence whatever its length (fp32); 0 for exact attention."""
    a, Hkv, Q = config.attention, config.n_kv_heads, config.head_dim
    if a.approx == "none":
        return 0
    per_head = a.features * (Q + 1) + 1 if a.approx == "performer" else 2 * a.rank * Q
    return _attention_layers(config) * (Hkv * per_head + (a.approx == "linformer")) * 4


def ssd_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """The SSD layers' term 6 L_ssd (H Q P + G Q N + 2 H P N) (module docstring); 0 without SSD layers."""
    s = config.ssd
    if s is None:
        return 0
    H, Q = s.expand * config.dim // s.head_dim, min(s.chunk, seq_len)
    per_layer = H * Q * s.head_dim + s.n_groups * Q * s.state_dim + 2 * H * s.head_dim * s.state_dim
    return 6 * (config.n_layers - _attention_layers(config)) * per_layer


def ssd_state_bytes(config: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes the SSD layers keep per sequence whatever its length: fp32 states, conv inputs at `dtype`."""
    s = config.ssd
    if s is None:
        return 0
    inner = s.expand * config.dim
    per_layer = inner * s.state_dim * 4 + (s.conv_width - 1) * (inner + 2 * s.n_groups * s.state_dim) * _bytes(dtype)
    return (config.n_layers - _attention_layers(config)) * per_layer


def _attention_layers(config: ModelConfig) -> int:
    return sum(not config.is_ssd_layer(i) for i in range(config.n_layers))


def training_flops_per_token(config: ModelConfig, seq_len: int, active: dict[str, int] | None = None) -> int:
    """6 N + attention term + SSD term (module docstring); `active` defaults to `active_breakdown(config)`."""
    active = active if active is not None else active_breakdown(config)
    return (6 * active_matmul_params(config, active) + attention_flops_per_token(config, seq_len)
            + ssd_flops_per_token(config, seq_len))


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes the KV cache keeps per token, over all attention layers, at `dtype` (0 for approximate
    attention: `approx_state_bytes`)."""
    if config.attention.approx != "none":
        return 0
    if config.mla is not None:
        per_layer = config.mla.kv_rank + config.mla.rope_dim
    else:
        per_layer = 2 * config.n_kv_heads * config.head_dim
    return _attention_layers(config) * per_layer * _bytes(dtype)


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
        "ssd_state_bytes": ssd_state_bytes(config, dtype),
        "approx_state_bytes": approx_state_bytes(config),
        "training_memory_bytes": training_memory(total["total"], dtype),
    }


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, by name; None where unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]
