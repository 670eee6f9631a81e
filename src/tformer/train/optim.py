"""AdamW with decoupled weight decay on matrices only (not on norms, biases or embeddings).

`make_optimizer` gives torch's fused AdamW on CUDA (foreach on CPU), whose moment estimates have the
parameters' dtype (fp32 master weights: fp32 states). With `state_dtype=torch.bfloat16` it gives
`AdamWLowPrecisionStates` instead: the same update, computed in fp32, with both moments stored in
bf16, which halves the optimiser's memory (8 -> 4 bytes a parameter); parameters are updated in runs of
about 64M elements, so the fp32 working copies stay a bounded transient.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights of Linear layers; keep norms, biases and embedding tables undecayed."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embeddings |= {id(p) for n, p in model.named_parameters() if n.startswith("pos_emb")}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                   state_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if state_dtype != torch.float32:
        return AdamWLowPrecisionStates(groups, lr=lr, betas=betas, eps=eps, state_dtype=state_dtype)
    device = next(model.parameters()).device
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {"foreach": True}  # CPU: one multi-tensor update, not one per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


class AdamWLowPrecisionStates(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW's update, bias-corrected) whose first and
    second moments are stored in `state_dtype` (bf16) and widened to fp32 for each update:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr (wd p + m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps))

    The state dict has torch's AdamW layout (step, exp_avg, exp_avg_sq), so checkpoints load either way.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    chunk_numel = 1 << 26  # parameters updated together: their fp32 working copies are the transient memory

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
            for chunk in self._chunks(params):
                self._update(group, chunk)
        return loss

    def _chunks(self, params: list) -> list[list]:
        """`params` in runs of about `chunk_numel` elements (a larger tensor alone)."""
        chunks, size = [[]], 0
        for p in params:
            if chunks[-1] and size + p.numel() > self.chunk_numel:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += p.numel()
        return [c for c in chunks if c]

    def _update(self, group: dict, params: list) -> None:
        b1, b2 = group["betas"]
        t = float(self.state[params[0]]["step"])  # every parameter of a group steps together
        grads = [p.grad.float() for p in params]
        m = [self.state[p]["exp_avg"].float() for p in params]
        v = [self.state[p]["exp_avg_sq"].float() for p in params]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - b2**t) ** 0.5)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, -group["lr"] / (1 - b1**t))
        for p, m_i, v_i in zip(params, m, v):
            self.state[p]["exp_avg"].copy_(m_i)
            self.state[p]["exp_avg_sq"].copy_(v_i)
