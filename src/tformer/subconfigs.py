"""The sub-configurations of a ModelConfig for mixture-of-experts FFNs and latent attention.

Defined apart from `tformer.config` (which re-exports both) to keep each file small; validated the
same way, through `tformer.fields`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tformer.fields import ConfigError, check_fields

ScoreFunc = Literal["softmax", "sigmoid"]


@dataclass
class MoEConfig:
    """Mixture of experts in place of the dense FFN (Shazeer et al. 2017; Switch, Mixtral, DeepSeekMoE).

    Each token's router scores pick `top_k` of `n_experts` routed SwiGLU experts; `n_shared_experts`
    run on every token (DeepSeekMoE). Layer i is MoE when i >= first_dense and
    (i - first_dense) % interval == 0; the other layers keep the dense FFN of `ModelConfig.ffn_dim`.
    """

    n_experts: int = 8
    top_k: int = 2
    expert_dim: int | None = None  # ffn width of one routed expert; None: ModelConfig.ffn_dim
    n_shared_experts: int = 0
    shared_dim: int | None = None  # width of the (single, merged) shared FFN; None: n_shared * expert_dim
    shared_gate: bool = False  # Qwen2-MoE: the shared FFN output is scaled by sigmoid(w x)
    score_func: ScoreFunc = "softmax"  # softmax (Mixtral, Qwen, DeepSeek-V2) or sigmoid (DeepSeek-V3)
    norm_topk: bool = True  # renormalise the chosen top-k weights to sum to 1
    routed_scale: float = 1.0  # routed output multiplier (DeepSeek routed_scaling_factor)
    n_groups: int = 1  # group-limited routing (DeepSeek-V3): experts split in n_groups groups ...
    topk_groups: int = 1  # ... and a token picks experts only from its best topk_groups groups
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3): per-expert bias, selection only
    bias_update_rate: float = 1e-3  # step of the expert bias update (sign of the load error)
    capacity_factor: float | None = None  # None: no dropping; else capacity = factor * tokens * top_k / n_experts
    aux_loss_coef: float = 0.0  # Switch load-balancing loss weight (Fedus et al. 2021)
    z_loss_coef: float = 0.0  # router z-loss weight (Zoph et al. 2022)
    first_dense: int = 0  # the first layers keep a dense FFN (DeepSeek first_k_dense_replace)
    interval: int = 1  # then every interval-th layer is MoE (2: every other layer)

    def __post_init__(self) -> None:
        check_fields(self, "moe.")

    def validate(self) -> None:
        for name in ("n_experts", "top_k", "n_groups", "topk_groups", "interval"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"moe.{name} must be a positive integer, got {value!r}")
        for name in ("expert_dim", "shared_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"moe.{name} must be a positive integer or None, got {value!r}")
        if self.n_shared_experts < 0 or self.first_dense < 0:
            raise ConfigError("moe.n_shared_experts and moe.first_dense must be >= 0")
        if self.top_k > self.n_experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.n_experts={self.n_experts}")
        if self.n_experts % self.n_groups:
            raise ConfigError(f"moe.n_experts={self.n_experts} is not divisible by moe.n_groups={self.n_groups}")
        if self.topk_groups > self.n_groups:
            raise ConfigError(f"moe.topk_groups={self.topk_groups} exceeds moe.n_groups={self.n_groups}")
        if self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            raise ConfigError(
                f"moe.top_k={self.top_k} exceeds the experts in the best {self.topk_groups} group(s): "
                "raise moe.topk_groups or lower moe.top_k"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0 or self.bias_update_rate < 0:
            raise ConfigError("moe.aux_loss_coef, moe.z_loss_coef and moe.bias_update_rate must be >= 0")
        if self.shared_gate and not (self.n_shared_experts or self.shared_dim):
            raise ConfigError("moe.shared_gate needs a shared expert: set moe.n_shared_experts or moe.shared_dim")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024).

    K and V are rebuilt per head from one `kv_rank` latent per token, which is all the KV cache
    keeps (plus the `rope_dim` key part, shared by all heads). Each head's q/k is `nope_dim`
    dims without positions and `rope_dim` dims with RoPE; values have `v_dim` dims.
    """

    q_rank: int | None = None  # None: full-rank query projection (DeepSeek-V2-Lite)
    kv_rank: int = 512
    nope_dim: int = 128
    rope_dim: int = 64
    v_dim: int = 128
    softmax_scale: float | None = None  # None: 1/sqrt(nope_dim + rope_dim); YaRN models scale it

    def __post_init__(self) -> None:
        check_fields(self, "mla.")

    def validate(self) -> None:
        for name in ("kv_rank", "nope_dim", "rope_dim", "v_dim"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"mla.{name} must be a positive integer, got {value!r}")
        if self.q_rank is not None and self.q_rank <= 0:
            raise ConfigError(f"mla.q_rank must be a positive integer or None, got {self.q_rank!r}")
        if self.rope_dim % 2:
            raise ConfigError(f"mla.rope_dim must be even (RoPE rotates pairs), got {self.rope_dim}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ConfigError(f"mla.softmax_scale must be > 0 or None, got {self.softmax_scale}")
