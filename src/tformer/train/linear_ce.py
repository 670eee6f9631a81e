"""The output head and the cross-entropy in one, over chunks of rows: the (N, V) logits never exist.

    linear_cross_entropy(hidden, weight, targets)
        == F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=..., label_smoothing=...)
    hidden (N, C) or (B, T, C); weight (V, C), the output head; targets (N,) or (B, T)

A language model's fp32 logits take N·V·4 bytes (4.2 GB for 8 x 2048 tokens at Llama 3's V = 128,256)
and their gradient as much again. Here `chunk_size` rows at a time are projected to (chunk, V) fp32
logits, reduced to their loss and, in the forward already, turned into their share of the gradients
(the fused linear cross-entropy of Liger Kernel; Wijmans et al. 2024, "Cut Your Losses"):

    d logits = (softmax(z) - (1 - e) onehot(t) - e / V) * s      s = 1 / n_valid (mean) or 1 (sum)
    d hidden[rows] = d logits @ W          stored, (N, C)
    d W += d logits^T @ hidden[rows]       accumulated, (V, C); skipped for a frozen head (LoRA)

The backward only scales the stored gradients by the loss's incoming gradient. Extra memory is
O(chunk·V) for the chunk's logits plus the (N, C) and (V, C) gradients autograd would hold anyway.

Conventions: rows whose target is `ignore_index` add no loss and get no gradient; "mean" divides by
the number of other rows, and is 0 with zero gradients when every target is ignored (where
F.cross_entropy returns NaN). Targets outside [0, V) fail as they do in F.cross_entropy.
Precision: the matmuls run in the autocast dtype under autocast, else in hidden's dtype (weight must
match it then, as for `hidden @ weight.T`); the softmax, the loss and their sums run in fp32. A bf16
d W is accumulated in bf16, rounded once a chunk.
torch.compile: the function traces whole (the chunk loop unrolls; the autograd.Function's forward
and backward are captured), so `torch.compile(lambda x, y: linear_cross_entropy(model.features(x),
model.output.weight, y))` compiles the model and the loss as one graph. The backward runs once:
with retain_graph a second backward through it raises (its stored gradients are scaled in place).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 512 * 2**20  # default chunk: rows whose fp32 logits take about this much
CHUNK_MULTIPLE = 128  # default chunks are a whole number of these rows (matmul tiles)
REDUCTIONS = ("mean", "sum")


def default_chunk_size(vocab_size: int) -> int:
    """Rows a chunk holds when `chunk_size` is not given: about CHUNK_BYTES of fp32 logits
    (1,024 rows at V = 128,256; 2,560 at GPT-2's padded 50,304), a multiple of CHUNK_MULTIPLE."""
    rows = CHUNK_BYTES // (4 * vocab_size) // CHUNK_MULTIPLE * CHUNK_MULTIPLE
    return max(CHUNK_MULTIPLE, rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, label_smoothing: float = 0.0, chunk_size: int | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy of `hidden @ weight.T` against `targets`, a 0-dim fp32 tensor (module docstring).

    hidden (N, C) or (B, T, C); weight (V, C), e.g. `model.output.weight` (tied or frozen: gradients
    go wherever autograd sends them; none are computed for a tensor that does not require one);
    targets (N,) or (B, T), integers in [0, V) or `ignore_index`; chunk_size: rows per chunk
    (default `default_chunk_size(V)`); reduction: "mean" over non-ignored targets, or "sum".
    """
    _check(hidden, weight, targets, label_smoothing, chunk_size, reduction)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    t = targets.reshape(-1)  # (N,)
    dtype = _compute_dtype(hidden, weight)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if not (need_h or need_w):
        return _chunked(h, weight, t, ignore_index, label_smoothing, chunk, reduction, dtype, False, False)[0]
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, label_smoothing, chunk, reduction, dtype,
                                     need_h, need_w)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and the gradients of hidden and weight (`_chunked`); backward: them, scaled."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, smoothing, chunk, reduction, dtype, need_h, need_w):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _chunked(hidden, weight, targets, ignore_index, smoothing, chunk, reduction,
                                            dtype, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_loss).to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.dtypes[1]).mul_(grad_loss)  # in place: no second (V, C) tensor
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _chunked(h, w, t, ignore_index: int, smoothing: float, chunk: int, reduction: str, dtype: torch.dtype,
             need_h: bool, need_w: bool):
    """(loss, d loss/d h or None, d loss/d w or None) for h (N, C), w (V, C), t (N,), `chunk` rows at a time."""
    n_rows, vocab = h.shape[0], w.shape[0]
    h, w = h.to(dtype), w.to(dtype)
    valid = t != ignore_index  # (N,)
    t = torch.where(valid, t, 0)
    if reduction == "mean":
        scale = 1.0 / valid.sum().clamp(min=1).float()  # all ignored: loss 0, gradients 0
    else:
        scale = torch.ones((), device=h.device)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(w) if need_w else None
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        z = (h[rows] @ w.T).float()  # (n, V) logits
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        target = t[rows, None]  # (n, 1)
        row_loss = lse - (1.0 - smoothing) * z.gather(1, target).squeeze(1)
        if smoothing:  # e times the loss against the uniform distribution: lse - mean(z)
            row_loss = row_loss - smoothing * z.mean(dim=-1)
        loss = loss + torch.where(valid[rows], row_loss, 0.0).sum()
        if not (need_h or need_w):
            continue
        g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
        if smoothing:
            g.sub_(smoothing / vocab)
        g.scatter_add_(1, target, torch.full_like(target, smoothing - 1.0, dtype=g.dtype))
        g = g.mul_((valid[rows] * scale)[:, None]).to(dtype)  # (n, V) d loss / d logits
        if need_h:
            grad_h[rows] = g @ w
        if need_w:
            grad_w.addmm_(g.T, h[rows])
    return loss * scale, grad_h, grad_w


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one to the other, "
                        "or call under torch.autocast")
    return hidden.dtype


def _check(hidden, weight, targets, smoothing: float, chunk_size, reduction: str) -> None:
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, C) or (B, T, C) and weight (V, C), got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be class indices (an integer tensor), got {targets.dtype}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing={smoothing}: expected a number in [0, 1]")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive number of rows, or None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS} (per-row losses are not supported)")
