"""Decoder attention variants, each stated once as a FlexAttention mask_mod or score_mod.

Shapes: B batch, H heads, T queries, S key slots (T without a cache, the cache size with one).
A mask_mod (b, h, q, kv) -> bool (True = attend) and a score_mod (score, b, h, q, kv) -> score take
index tensors that broadcast: scalars inside FlexAttention (tformer.inference.flex), index grids in
`dense_mask` / `dense_bias`, which give SDPA the same rule as a (B|1, 1, T, S) mask and a (B|1, H, T, S)
bias. q and kv index the queries of this forward and the key slots.

Which keys a query sees (`LayerRule`, one a layer from `ModelConfig.attention`):

    causal        k <= q                                  (slots)
    window w      q - k < w                               (slots; Mistral, per-layer windows: Gemma 2)
    prefix P      causal, or q < P and k < P              (positions; prefix LM, Raffel et al. 2020)
    strided n     causal, and q - k < n or n | (q - k)    (positions; Child et al. 2019)
    fixed n, c    causal, and k in q's block of n, or k among the last c of its block (Child et al. 2019)
    local_global  causal, and within the window, or k < G, or q < G (Longformer, Beltagy et al. 2020)

then, for every rule, the same packed sequence (`segments`) and a real key (`key_valid`), or the
query's own slot, so that a padding query never has an empty row. Slots and positions differ only
under left padding, where positions count real tokens; distances are equal in both.
Scores: ALiBi (Press et al. 2022), T5's bucketed bias (Raffel et al. 2020) and Gemma 2's logit softcap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tformer.config import ModelConfig
from tformer.nn.attention import Attention, reference_attention
from tformer.nn.masks import encoder_mask_mod
from tformer.nn.position import relative_bucket


def _prefix(r, near, causal, q, k):
    return near | ((q < r.prefix) & (k < r.prefix))


def _strided(r, near, causal, q, k):
    return near & ((q - k < r.block) | ((q - k) % r.block == 0))


def _fixed(r, near, causal, q, k):
    return near & ((q // r.block == k // r.block) | (k % r.block >= r.block - r.summary))


def _local_global(r, near, causal, q, k):
    return near | (causal & ((k < r.n_global) | (q < r.n_global)))


# The registry: pattern -> f(rule, near, causal, q_pos, k_pos) -> bool, the keys each query sees (module
# docstring). causal: k <= q by slots; near: causal and within the layer's window; q_pos/k_pos: positions.
PATTERNS = {"causal": lambda r, near, causal, q, k: near, "prefix": _prefix, "strided": _strided, "fixed": _fixed,
            "local_global": _local_global}


@dataclass(frozen=True)
class LayerRule:
    """Which keys a layer's queries see (`PATTERNS[pattern]` with the layer's window); equal rules share
    one mask per forward."""

    pattern: str = "causal"
    window: int | None = None
    prefix: int = 0
    block: int = 128
    summary: int = 1
    n_global: int = 0

    @property
    def plain(self) -> bool:
        """Plain causal attention: SDPA's is_causal path serves it without a mask."""
        return self.pattern == "causal" and self.window is None

    def allows(self, q_slot, k_slot, q_pos, k_pos):
        causal = k_slot <= q_slot
        near = causal if self.window is None else causal & (q_slot - k_slot < self.window)
        return PATTERNS[self.pattern](self, near, causal, q_pos, k_pos)


def layer_rules(config: ModelConfig) -> list[LayerRule]:
    """One LayerRule a layer: `attention.pattern` with the layer's window (`AttentionConfig.window`)."""
    a = config.attention
    return [LayerRule(a.pattern, a.window(i, config.sliding_window), a.prefix, a.block, a.summary, a.n_global)
            for i in range(config.n_layers)]


@dataclass
class MaskInputs:
    """What one forward's masks read, shared by every layer.

    q_slots (T,) or (B, T): each query's key slot. key_valid (B, S): 1 for real keys (None: all).
    segments (B, T): packed sequence ids (cache-free, S = T). q_pos (B, T), k_pos (B, S): positions
    where they differ from slots (padding, packing); None: the slots. cached: keys come from a cache.
    """

    q_slots: torch.Tensor
    n_keys: int
    key_valid: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    cached: bool = False

    @property
    def rows(self) -> int | None:
        """The batch size where rows of the batch have masks of their own, else None (one for all)."""
        if self.q_slots.dim() == 2:
            return self.q_slots.shape[0]
        return next((t.shape[0] for t in (self.key_valid, self.segments, self.q_pos, self.k_pos) if t is not None),
                    None)

    @property
    def per_row(self) -> bool:
        return self.rows is not None

    @property
    def plain(self) -> bool:
        """Causal over this forward's own T queries with nothing else to hide (no cache, padding, packing)."""
        return not self.cached and not self.per_row



def _query_slot(q_slots: torch.Tensor):
    """(b, q) -> the key slot of query q of row b, for q_slots (T,) or (B, T).

    The mods close over tensors and plain values only (never a MaskInputs), so that a compiled
    FlexAttention guards on tensor shapes rather than on a new object each forward."""
    if q_slots.dim() == 2:
        return lambda b, q: q_slots[b, q]
    return lambda b, q: q_slots[q]


def mask_mod(rule: LayerRule, inputs: MaskInputs):
    """`rule` over one forward's queries and keys as a FlexAttention mask_mod (module docstring)."""
    key_valid, segments, q_pos, k_pos = inputs.key_valid, inputs.segments, inputs.q_pos, inputs.k_pos
    query_slot = _query_slot(inputs.q_slots)

    def mod(b, h, q, kv):
        q_slot = query_slot(b, q)
        q_at = q_slot if q_pos is None else q_pos[b, q]
        allowed = rule.allows(q_slot, kv, q_at, kv if k_pos is None else k_pos[b, kv])
        if segments is not None:
            allowed = allowed & (segments[b, q] == segments[b, kv])
        if key_valid is not None:
            allowed = allowed & (key_valid[b, kv].bool() | (q_slot == kv))
        return allowed

    return mod


def bidirectional_mask_mod(key_valid=None, segments=None, window: int | None = None):
    """An encoder's rule (every real key of the same sequence, |q - k| <= window): tformer.nn.masks'."""
    return encoder_mask_mod(key_valid, segments, window)


def alibi_score_mod(slopes: torch.Tensor, inputs: MaskInputs):
    """ALiBi: score + slope_h * (k - q), the slot distance (<= 0 where causal). slopes (H,)."""

    query_slot = _query_slot(inputs.q_slots)

    def mod(score, b, h, q, kv):
        return score + slopes[h] * (kv - query_slot(b, q)).float()

    return mod


def t5_score_mod(weight: torch.Tensor, n_buckets: int, max_distance: int, inputs: MaskInputs):
    """T5's causal relative position bias: score + weight[bucket(k - q), h]. weight (n_buckets, H)."""

    query_slot = _query_slot(inputs.q_slots)

    def mod(score, b, h, q, kv):
        bucket = relative_bucket(kv - query_slot(b, q), False, n_buckets, max_distance)
        return score + weight[bucket, h]

    return mod


def softcap_score_mod(softcap: float, then=None):
    """Gemma 2's logit cap: softcap * tanh(score / softcap), then the score_mod `then` (a bias) if given."""

    def mod(score, b, h, q, kv):
        capped = softcap * torch.tanh(score / softcap)
        return capped if then is None else then(capped, b, h, q, kv)

    return mod


def _grids(inputs: MaskInputs, T: int, device):
    """Index grids b (B|1, 1, 1, 1), q (T, 1), kv (1, S) for evaluating a mod densely."""
    b = torch.arange(inputs.rows or 1, device=device)[:, None, None, None]
    return b, torch.arange(T, device=device)[:, None], torch.arange(inputs.n_keys, device=device)[None, :]


def dense_bias(score_mod, inputs: MaskInputs, n_heads: int) -> torch.Tensor:
    """`score_mod` evaluated at score 0 over every head, query and key: (B|1, H, T, S) float32."""
    T, device = inputs.q_slots.shape[-1], inputs.q_slots.device
    b, q, kv = _grids(inputs, T, device)
    h = torch.arange(n_heads, device=device)[:, None, None]  # (H, 1, 1)
    bias = score_mod(torch.zeros((), device=device), b, h, q, kv)  # (H, T, S) or (B, H, T, S)
    return bias.float().reshape(-1, n_heads, T, inputs.n_keys)


def dense_mask(rule: LayerRule, inputs: MaskInputs, bias=None, n_heads: int = 1) -> torch.Tensor | None:
    """The mask SDPA takes for `rule`: None (plain causal: the flash path), (B|1, 1, T, S) bool, or with a
    bias score_mod (ALiBi, T5) a (B|1, H, T, S) float32 additive mask, -inf-like where masked."""
    if rule.plain and inputs.plain and bias is None:
        return None
    T, device = inputs.q_slots.shape[-1], inputs.q_slots.device
    b, q, kv = _grids(inputs, T, device)
    allowed = mask_mod(rule, inputs)(b, 0, q, kv)  # (T, S) or (B, 1, T, S)
    allowed = allowed.reshape(-1, 1, T, inputs.n_keys)  # (B|1, 1, T, S)
    if bias is None:
        return allowed
    additive = dense_bias(bias, inputs, n_heads)
    return torch.where(allowed, additive, torch.finfo(torch.float32).min)


class SoftcapAttention(Attention):
    """Attention with capped logits, softmax(softcap * tanh(q k^T * scale / softcap) + mask) v.

    SDPA has no softcap, so the scores are explicit (`reference_attention`'s formula); FlexAttention
    (tformer.inference.flex) replaces `core` with its fused form. Never fused by the decode kernels."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.softcap = config.attention.softcap

    def core(self, q, k, v, mask=None, dropout_p: float = 0.0):
        return reference_attention(q, k, v, mask, dropout_p, self.scale, softcap=self.softcap)[0]
