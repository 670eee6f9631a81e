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


AttentionPattern = Literal["causal", "prefix", "strided", "fixed", "local_global"]
AttentionApprox = Literal["none", "linformer", "performer"]


@dataclass
class AttentionConfig:
    """Which attention a decoder's layers compute (tformer.nn.variants, tformer.nn.approx).

    pattern (which keys a query sees, on top of causality and `ModelConfig.sliding_window`):
      "causal"        every earlier key;
      "prefix"        prefix-LM: the first `prefix` tokens see each other both ways (T5's prefix LM);
      "strided"       GPT-3 / Sparse Transformer strided: the last `block` keys, and every key whose
                      distance is a multiple of `block` (Child et al. 2019);
      "fixed"         Sparse Transformer fixed: keys in the query's block of `block` tokens, and the last
                      `summary` keys of every earlier block;
      "local_global"  Longformer: a sliding window (from `windows` or sliding_window) plus the first
                      `n_global` tokens, which see and are seen by every token.
    windows: a window per layer (0: that layer is global), repeated when shorter than n_layers
      (Gemma 2's [4096, 0], Mistral-style per-layer windows); None: `ModelConfig.sliding_window` for all.
    softcap: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2); None: off.
    approx: an approximation in place of exact softmax attention (tformer.nn.approx), linear in the
      sequence length: "linformer" (keys and values projected along the sequence to `rank` rows by
      learned (rank, max_seq_len) matrices; causal in a decoder by cumulative projection) or
      "performer" (FAVOR+, `features` orthogonal positive random features; causal by prefix sums).
      Both keep O(1)-per-token decoding state instead of a KV cache. Causal or bidirectional full
      attention with key padding only: not with MLA, sliding windows, other patterns, softcap,
      ALiBi or an encoder-decoder (`check_approx`).
    rank: Linformer's projected length k (<= max_seq_len); features: Performer's random features m.
    backend: "auto" FlexAttention on CUDA, masked SDPA elsewhere; "sdpa" or "flex" to force one.
    """

    pattern: AttentionPattern = "causal"
    windows: list[int] | None = None
    prefix: int = 0
    block: int = 128
    summary: int = 1
    n_global: int = 0
    softcap: float | None = None
    approx: AttentionApprox = "none"
    rank: int = 64
    features: int = 64
    backend: Literal["auto", "sdpa", "flex"] = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "attention.")

    def validate(self) -> None:
        for name in ("block", "summary", "rank", "features"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"attention.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("prefix", "n_global"):
            if getattr(self, name) < 0:
                raise ConfigError(f"attention.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.windows is not None and (not self.windows or min(self.windows) < 0):
            raise ConfigError(f"attention.windows must be a non-empty list of windows >= 0 (0: global), "
                              f"got {self.windows!r}")
        if self.softcap is not None and self.softcap <= 0:
            raise ConfigError(f"attention.softcap must be > 0 or None, got {self.softcap}")
        if self.summary > self.block:
            raise ConfigError(f"attention.summary={self.summary} must be <= attention.block={self.block}")

    def check_model(self, config) -> None:
        """The fields that depend on the model (a ModelConfig): what its architecture and windows allow."""
        exact = self.pattern != "causal" or self.windows is not None or self.softcap is not None
        if exact and config.architecture != "decoder":
            raise ConfigError("attention.pattern, attention.windows and attention.softcap shape a decoder's "
                              f"attention: leave them at their defaults for architecture={config.architecture!r}")
        if self.pattern == "prefix" and self.prefix == 0:
            raise ConfigError("attention.pattern='prefix' needs attention.prefix > 0 (the tokens that see each "
                              "other both ways)")
        if self.pattern == "local_global":
            windows = [self.window(i, config.sliding_window) for i in range(config.n_layers)]
            if all(w is None for w in windows):
                raise ConfigError("attention.pattern='local_global' needs a window: set attention.windows or "
                                  "sliding_window")
            if self.n_global == 0:
                raise ConfigError("attention.pattern='local_global' needs attention.n_global > 0 (the global "
                                  "tokens); without them use pattern='causal' with a window")
        if self.softcap is not None and config.mla is not None:
            raise ConfigError("attention.softcap is not implemented with mla: set one of them to None")
        if self.backend == "flex" and config.attn_dropout > 0:
            raise ConfigError(f"attention.backend='flex' has no attention dropout: set attn_dropout=0 (got "
                              f"{config.attn_dropout}) or attention.backend to 'auto' or 'sdpa'")

    def check_approx(self, model) -> None:
        """`approx` against the rest of the ModelConfig `model`: the approximations compute causal (or,
        in an encoder, bidirectional) attention over real keys and nothing else."""
        if self.approx == "none":
            return
        name = f"attention.approx={self.approx!r}"
        if model.architecture == "encoder_decoder":
            raise ConfigError(f"{name} is for decoder-only and encoder models, not encoder-decoders: "
                              "set attention.approx='none'")
        if model.mla is not None:
            raise ConfigError(f"{name} replaces multi-head attention, not MLA: set mla=None or attention.approx='none'")
        if model.sliding_window is not None or self.windows is not None:
            raise ConfigError(f"{name} attends to every earlier key and has no windows: "
                              "set sliding_window and attention.windows to None")
        if self.pattern != "causal":
            raise ConfigError(f"{name} computes plain causal attention: set attention.pattern='causal' "
                              f"(got {self.pattern!r})")
        if self.softcap is not None:
            raise ConfigError(f"{name} has no scores to cap: set attention.softcap=None")
        if model.positions == "alibi":
            raise ConfigError(f"{name} cannot add ALiBi's distance bias: use positions 'rope', 'learned', "
                              "'sinusoidal' or 'none'")
        if self.approx == "performer" and model.attn_dropout > 0:
            raise ConfigError(f"{name} forms no attention weights to drop: set attn_dropout=0 "
                              f"(got {model.attn_dropout})")
        if self.approx == "linformer" and self.rank > model.max_seq_len:
            raise ConfigError(f"attention.rank={self.rank} exceeds max_seq_len={model.max_seq_len}: Linformer "
                              "projects max_seq_len positions to rank rows; lower attention.rank")

    def window(self, layer: int, default: int | None) -> int | None:
        """The sliding window of layer `layer` (None: global): `windows` cycled, else `default`."""
        if self.windows is None:
            return default
        w = self.windows[layer % len(self.windows)]
        return w or None


@dataclass
class SSDConfig:
    """Mamba-2 state-space mixers (SSD, Dao & Gu 2024) in place of attention in chosen layers.

    Layer i mixes with SSD when i is in `layers` (None: every layer); the others keep attention.
    Each SSD layer has expand * dim inner channels in heads of `head_dim`, a `state_dim` state per
    head, `n_groups` groups of shared B/C projections, a causal depthwise conv of `conv_width`, and
    trains in the chunked matmul form with chunks of `chunk` tokens (tformer.nn.ssd).
    dt_min, dt_max: the range of the initial step sizes (log-uniform; Mamba-2's 0.001, 0.1).
    norm_before_gate: the output norm is RMSNorm(y) * silu(z) instead of Mamba-2's RMSNorm(y * silu(z)).
    """

    layers: list[int] | None = None
    state_dim: int = 64
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_width: int = 4
    chunk: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    norm_before_gate: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "ssd.")

    def validate(self) -> None:
        for name in ("state_dim", "head_dim", "expand", "n_groups", "conv_width", "chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ssd.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.layers is not None and min(self.layers, default=0) < 0:
            raise ConfigError(f"ssd.layers must list layer indices >= 0, got {self.layers!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"ssd.dt_min and ssd.dt_max must satisfy 0 < dt_min <= dt_max, "
                              f"got {self.dt_min} and {self.dt_max}")

    def check_model(self, dim: int, n_layers: int) -> None:
        """The fields that depend on the model's dim and depth."""
        if self.layers is not None and max(self.layers, default=0) >= n_layers:
            raise ConfigError(f"ssd.layers={self.layers} names a layer past n_layers={n_layers} (layers count from 0)")
        inner = self.expand * dim
        if inner % self.head_dim:
            raise ConfigError(f"ssd.head_dim={self.head_dim} does not divide the inner width ssd.expand * dim = "
                              f"{inner}: choose a head_dim that divides it")
        if (inner // self.head_dim) % self.n_groups:
            raise ConfigError(f"ssd.n_groups={self.n_groups} does not divide the {inner // self.head_dim} SSD heads "
                              "(ssd.expand * dim / ssd.head_dim): each group serves the same number of heads")
