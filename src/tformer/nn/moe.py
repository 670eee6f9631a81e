"""Mixture of experts in place of the dense FFN (Shazeer et al. 2017; Switch, Fedus et al. 2021;
Mixtral, Jiang et al. 2024; DeepSeekMoE, Dai et al. 2024; DeepSeek-V3, Liu et al. 2024).

Shapes: B batch, T time, C dim, N = B*T tokens, E experts, K = top_k experts a token,
A = N*K (token, slot) assignments, F expert width, G expert groups, M capacity (rows per expert).

    x (N,C) -> router -> top-k experts (N,K) and weights (N,K)
            -> assignments sorted by expert (A,) -> grouped SwiGLU experts (A,C)
            -> weighted sum over each token's K slots (N,C)  [+ shared experts on every token]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tformer.config import GATED_ACTIVATIONS, ModelConfig
from tformer.nn.buffers import FP32Buffers
from tformer.nn.mlp import ACTIVATIONS, GatedFeedForward


class Router(FP32Buffers):
    """Token -> top-k experts and their weights, all in fp32 (the gate matmul too, as HF DeepSeek-V3).

    scores = softmax (Mixtral, Qwen2-MoE) or sigmoid (DeepSeek-V3) of the gate logits. Selection may
    add `expert_bias` (DeepSeek-V3's aux-loss-free balancing) and keep only the best `topk_groups`
    of `n_groups` expert groups (group score: sum of its top-2 scores, as in DeepSeek-V3 / HF).
    Weights are the chosen *unbiased* scores, renormalised to sum 1 when `norm_topk`, times `routed_scale`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.moe
        self.gate = nn.Linear(config.dim, m.n_experts, bias=False)
        self.top_k, self.n_groups, self.topk_groups = m.top_k, m.n_groups, m.topk_groups
        self.softmax, self.norm_topk, self.routed_scale = m.score_func == "softmax", m.norm_topk, m.routed_scale
        if m.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(m.n_experts))  # (E,)
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor):
        """x (N, C) -> weights (N, K) fp32, experts (N, K) int64, logits (N, E) fp32, scores (N, E) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # top-k picks are precision-sensitive: fp32
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits.softmax(-1) if self.softmax else logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        if self.n_groups > 1:
            choice = self._best_groups(choice)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(-1, experts)  # (N, K)
        if self.norm_topk:  # HF DeepSeek-V3 adds 1e-20; a no-op in fp32 for Mixtral/Qwen's sums >= 1/E
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scale, experts, logits, scores

    def _best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """(N, E) -> (N, E) with the experts outside each token's best `topk_groups` groups at -inf."""
        N, E = choice.shape
        grouped = choice.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
        group_scores = grouped.topk(min(2, E // self.n_groups), dim=-1).values.sum(-1)  # (N, G)
        best = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)


def grouped_mm_available() -> bool:
    """Whether torch._grouped_mm can serve the experts on this machine: it exists, and any CUDA device
    is Hopper (sm90) or newer (its CUDA kernel). Checked once, when the module is built."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (9, 0)


def grouped_mm_runs(dtype: torch.dtype, device: torch.device, dims: tuple[int, ...]) -> bool:
    """Whether torch._grouped_mm takes these inputs (torch 2.11-2.13): bf16, or fp32 on CPU in eager
    mode only (the meta kernel torch.compile traces with accepts bf16 alone); every row stride
    (C and F elements) a multiple of 16 bytes. Static: dynamo folds it to a constant."""
    fp32_eager_cpu = dtype == torch.float32 and device.type == "cpu" and not torch.compiler.is_compiling()
    aligned = all(d * dtype.itemsize % 16 == 0 for d in dims)
    return (dtype == torch.bfloat16 or fp32_eager_cpu) and aligned


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (x may be the fp32 residual stream)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E gated experts w2(act(w1 x) * w3 x) held as stacked weights, run as grouped matmuls.

    Assignments are sorted by expert (static size A = N*K, no host sync), then one
    `torch._grouped_mm` per weight covers every expert with per-expert row offsets. Where that kernel
    cannot run, each expert's rows are padded into an (E, M, C) batch for `torch.bmm`; M = capacity,
    or N without one (an expert gets each token at most once), costing E/K times the grouped FLOPs.

    capacity_factor (Switch): an expert takes at most M = ceil(factor * N * K / E) assignments, in
    token order; later ones are dropped (contribute 0). The grouped path still computes them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.moe
        E, C, Fd = m.n_experts, config.dim, m.expert_dim or config.ffn_dim
        self.w1 = nn.Parameter(torch.empty(E, Fd, C))  # gate
        self.w3 = nn.Parameter(torch.empty(E, Fd, C))  # up
        self.w2 = nn.Parameter(torch.empty(E, C, Fd))  # down
        self.act = ACTIVATIONS[GATED_ACTIVATIONS[config.activation]]
        self.capacity_factor = m.capacity_factor
        self.use_grouped_mm = grouped_mm_available()  # tests set False to run the padded path

    def extra_repr(self) -> str:
        E, Fd, C = self.w1.shape
        return f"n_experts={E}, dim={C}, expert_dim={Fd}, grouped_mm={self.use_grouped_mm}"

    def capacity(self, N: int, K: int) -> int:
        """Rows an expert takes from N tokens routed to K experts each."""
        if self.capacity_factor is None:
            return N
        return min(N, math.ceil(self.capacity_factor * N * K / self.w1.shape[0]))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor):
        """x (N, C), weights (N, K), experts (N, K), counts (E,) -> (N, C) fp32: sum_k weight * expert(x)."""
        N, K = experts.shape
        flat = experts.flatten()  # (A,) expert of assignment (token, slot) = token * K + slot
        order = flat.argsort(stable=True)  # (A,) by expert; token order within an expert
        by_expert = flat[order]  # (A,)
        ends = counts.cumsum(0)  # (E,) where each expert's rows end
        rank = torch.arange(N * K, device=x.device) - (ends - counts)[by_expert]  # (A,) row within its expert
        M = self.capacity(N, K)
        keep = rank < M  # (A,)
        dtype = compute_dtype(x)
        xs = x[order // K].to(dtype)  # (A, C) token rows, sorted by expert
        w1, w3, w2 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))  # (E, in, out)
        if self.use_grouped_mm and grouped_mm_runs(dtype, x.device, (x.shape[-1], self.w1.shape[1])):
            offs = ends.to(torch.int32)
            h = self.act(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)  # (A, F)
            ys = torch._grouped_mm(h, w2, offs=offs)  # (A, C)
        else:
            slot = torch.where(keep, by_expert * M + rank, self.w1.shape[0] * M)  # (A,) last row: dropped
            ys = self._padded(xs, slot, M, w1, w3, w2)
        w = weights.flatten()[order] * keep  # (A,) fp32; dropped: 0
        contrib = ys * w.unsqueeze(-1)  # (A, C) fp32
        return torch.zeros_like(contrib).index_copy_(0, order, contrib).view(N, K, -1).sum(1)

    def _padded(self, xs, slot, M: int, w1, w3, w2) -> torch.Tensor:
        """(A, C) rows sorted by expert, (A,) row in the (E*M + 1) padded batch (last: dropped) -> (A, C)."""
        E, C = w1.shape[0], xs.shape[-1]
        batch = xs.new_zeros(E * M + 1, C).index_copy(0, slot, xs)[:-1].view(E, M, C)
        h = self.act(torch.bmm(batch, w1)) * torch.bmm(batch, w3)  # (E, M, F)
        ys = torch.bmm(h, w2).flatten(0, 1)  # (E*M, C)
        return torch.cat([ys, ys.new_zeros(1, C)])[slot]


class AuxLossScaler(torch.autograd.Function):
    """Identity on `out`; backward also sends gradient 1 into `loss` (already coefficient-weighted),
    so an auxiliary loss trains without a change to forward's signature (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class MoE(FP32Buffers):
    """Routed experts plus optional shared experts, in place of a block's FFN: (B, T, C) -> (B, T, C).

    Training losses, when their coefficients are > 0, reach the gradient through `AuxLossScaler`:
    Switch load balancing E * sum_e f_e P_e (f_e: share of assignments to e; P_e: mean router
    probability of e, sigmoid scores normalised per token) and router z-loss mean(logsumexp(logits)^2)
    (ST-MoE, Zoph et al. 2022). Their last values stay in `aux_loss` / `z_loss` for logging.
    `tokens_per_expert` counts training assignments until `pop_load()`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.aux_coef, self.z_coef, self.bias_rate = m.aux_loss_coef, m.z_loss_coef, m.bias_update_rate
        self.aux_grad_scale = 1.0  # the training loop sets 1 / grad_accum, as it divides the main loss
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        shared_dim = m.shared_dim or m.n_shared_experts * (m.expert_dim or config.ffn_dim)
        self.shared = GatedFeedForward(config, shared_dim) if shared_dim else None
        self.shared_gate = nn.Linear(config.dim, 1, bias=False) if m.shared_gate else None  # Qwen2-MoE
        self.register_buffer("tokens_per_expert", torch.zeros(m.n_experts), persistent=False)  # (E,)
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)
        self.register_buffer("z_loss", torch.zeros(()), persistent=False)

    def reset_buffers(self) -> None:
        for buf in (self.tokens_per_expert, self.aux_loss, self.z_loss):
            buf.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        weights, experts, logits, scores = self.router(flat)  # (N, K), (N, K), (N, E), (N, E)
        ones = torch.ones_like(experts).flatten()
        counts = torch.zeros(self.n_experts, dtype=ones.dtype, device=x.device).scatter_add_(
            0, experts.flatten(), ones
        )  # (E,) assignments per expert
        out = self.experts(flat, weights, experts, counts)  # (N, C) fp32
        if self.shared is not None:
            shared = self.shared(flat)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(flat)) * shared)
        if self.training:
            self.tokens_per_expert += counts
            if self.aux_coef > 0 or self.z_coef > 0:
                out = AuxLossScaler.apply(out, self._losses(logits, scores, counts) * self.aux_grad_scale)
        return out.to(x.dtype).view(B, T, C)

    def _losses(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The coefficient-weighted training loss (scalar); logs the unweighted terms."""
        probs = scores if self.router.softmax else scores / scores.sum(-1, keepdim=True)  # (N, E)
        share = counts.float() / (self.top_k * logits.shape[0])  # (E,) f_e
        aux = self.n_experts * (share * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss.copy_(aux.detach())
        self.z_loss.copy_(z.detach())
        return self.aux_coef * aux + self.z_coef * z

    def pop_load(self) -> torch.Tensor:
        """Assignments per expert (E,) counted since the last call, which resets the count."""
        load = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """DeepSeek-V3's aux-loss-free balancing (Wang et al. 2024): after an optimiser step, raise
        the selection bias of under-loaded experts and lower it for over-loaded ones by
        `bias_update_rate`, from the load counted since the last `pop_load()`. No-op without a bias."""
        if self.router.expert_bias is not None:
            load = self.tokens_per_expert
            self.router.expert_bias += self.bias_rate * torch.sign(load.mean() - load)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def load_stats(layers: list[MoE]) -> dict[str, float]:
    """Pops each layer's load; the extremes over layers of expert load / mean load (1 = balanced),
    and the mean aux / z losses where trained with them. One host sync."""
    loads = torch.stack([m.pop_load() for m in layers])  # (L, E)
    ratio = loads / loads.mean(-1, keepdim=True).clamp(min=1)
    values = {"moe_load_max": ratio.max(), "moe_load_min": ratio.min()}
    if any(m.aux_coef > 0 for m in layers):
        values["moe_aux_loss"] = torch.stack([m.aux_loss for m in layers]).mean()
    if any(m.z_coef > 0 for m in layers):
        values["moe_z_loss"] = torch.stack([m.z_loss for m in layers]).mean()
    return dict(zip(values, torch.stack(list(values.values())).tolist()))
