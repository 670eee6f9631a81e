"""Attention masks, built once per forward and shared by every layer.

Shapes: B batch, H heads, T queries, S key slots (T without a cache, the cache size with one).
A boolean mask is True where a query may attend. `None` means "plain causal over T", which
lets SDPA pick its flash kernel (`is_causal=True`).

Decoders: `causal_mask`, `segment_mask` (packed examples). Encoders: `encoder_mask_mod` states the
bidirectional rule (padding, packed sequences, a window either side) once, as a FlexAttention
mask_mod; `encoder_mask` evaluates it into a dense mask for SDPA.
"""

from __future__ import annotations

import torch


def causal_mask(
    q_slots: torch.Tensor,
    n_keys: int,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(B or 1, 1, T, S) bool: causal, within `window` recent keys, and only valid (non-pad) keys.

    q_slots (T,), or (B, T) where each row has its own (a paged cache, tformer.serve): the key slot
    each query occupies. A query always sees its own slot, so a padding query never has an empty row
    (which would give NaN from softmax).
    """
    k_slots = torch.arange(n_keys, device=q_slots.device)
    q = q_slots[..., :, None]  # (T, 1) or (B, T, 1)
    allowed = k_slots <= q  # (T, S) or (B, T, S)
    if window is not None:
        allowed = allowed & (k_slots > q - window)
    allowed = allowed[None, None] if q_slots.dim() == 1 else allowed[:, None]  # (B or 1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, None, :]  # (B, 1, T, S)
        own = k_slots == q
        allowed = allowed | (own[None, None] if q_slots.dim() == 1 else own[:, None])
    return allowed


def as_additive(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Combine a boolean mask with an additive bias into one float mask for SDPA."""
    neg = torch.finfo(dtype).min
    return torch.where(mask, bias, torch.full_like(bias, neg)).to(dtype)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids of packed sequences -> (B, T) positions counted from each segment's start.

    A segment is a run of equal ids; positions restart at 0 wherever the id changes."""
    B, T = segments.shape
    slots = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return slots - torch.where(starts, slots, 0).cummax(-1).values


def segment_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: causal attention within each segment of packed sequences (B, T), so that
    examples packed into one row never see each other."""
    T = segments.shape[1]
    allowed = causal_mask(torch.arange(T, device=segments.device), T, window=window)  # (1, 1, T, T)
    return allowed & (segments[:, None, :, None] == segments[:, None, None, :])


def encoder_mask_mod(key_valid: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                     window: int | None = None):
    """An encoder's attention rule as a FlexAttention mask_mod (b, h, q, kv) -> bool (True = attend).

    Bidirectional: a query sees every key that is real (key_valid (B, T), 1 = real; None: all),
    in its own sequence (segments (B, T): a sequence id per token of a packed row; None: one
    sequence a row) and, with `window`, at most `window` positions away on either side
    (|q - k| <= window: HF ModernBERT's sliding mask, window = local_attention // 2). A query always
    sees itself, so a padding query never has an empty row (which would give NaN from softmax).
    """

    def mask_mod(b, h, q, kv):
        allowed = kv >= 0  # all True, in the broadcast shape
        if key_valid is not None:
            allowed = allowed & (key_valid[b, kv].bool() | (q == kv))
        if segments is not None:
            allowed = allowed & (segments[b, q] == segments[b, kv])
        if window is not None:
            allowed = allowed & ((q - kv).abs() <= window)
        return allowed

    return mask_mod


def encoder_mask(B: int, T: int, key_valid: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                 window: int | None = None, device=None) -> torch.Tensor:
    """`encoder_mask_mod`'s rule as a dense bool mask for SDPA: (B or 1, 1, T, T), or (B or 1, 1, 1, T) when
    it only hides padding keys (no segments, no window), which keeps SDPA's fused kernels."""
    if segments is None and window is None:
        if key_valid is None:
            return torch.ones(1, 1, 1, T, dtype=torch.bool, device=device)
        return key_valid.bool()[:, None, None, :]  # (B, 1, 1, T)
    b = torch.arange(B, device=device)[:, None, None, None]
    slots = torch.arange(T, device=device)
    allowed = encoder_mask_mod(key_valid, segments, window)(b, 0, slots[:, None], slots[None, :])
    return allowed.reshape(-1, 1, T, T)  # (B or 1, 1, T, T)
