"""Model configuration: one typed, validated description of a transformer.

Every architectural choice is a field with a default; a model family is a preset
(`tformer.presets`) that fills these fields, never a branch on its name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
NormKind = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
Positions = Literal["rope", "learned", "sinusoidal", "alibi", "none"]
RopeScaling = Literal["none", "linear", "dynamic", "yarn", "llama3"]

GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_tanh"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what to do."""


@dataclass
class RopeConfig:
    """Rotary position embedding (Su et al. 2021) and its context-extension variants.

    scaling: "linear" (position interpolation, Chen et al. 2023), "dynamic" (NTK-aware base
    growth past `original_max_seq_len`), "yarn" (Peng et al. 2023), "llama3" (Llama 3.1's
    wavelength-banded interpolation).
    """

    theta: float = 10000.0
    scaling: RopeScaling = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; default 0.1 ln(factor) + 1
    partial_rotary_factor: float = 1.0  # rotate only this share of each head's dims

    def validate(self) -> None:
        _check_choice("rope.scaling", self.scaling, RopeScaling)
        if self.theta <= 0:
            raise ConfigError(f"rope.theta must be > 0, got {self.theta}")
        if self.scaling != "none":
            if self.factor <= 0:
                raise ConfigError(f"rope.factor must be > 0 for scaling {self.scaling!r}, got {self.factor}")
            if self.scaling in ("dynamic", "yarn", "llama3") and not self.original_max_seq_len:
                raise ConfigError(
                    f"rope.scaling={self.scaling!r} needs rope.original_max_seq_len "
                    "(the context length the model was pretrained with)"
                )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"rope.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")


@dataclass
class ModelConfig:
    """A decoder-only transformer. Sizes use our names: dim, n_layers, n_heads, ..."""

    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int | None = None  # None: 4 * dim
    activation: Activation = "gelu"
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_placement: NormPlacement = "pre"
    positions: Positions = "learned"
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection
    ffn_bias: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 1024
    sliding_window: int | None = None  # attend to at most this many most recent keys
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02
    scale_residual_init: bool = True  # GPT-2: residual projections get std / sqrt(2 n_layers)

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        self.validate()
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                "change one of them or set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "each key/value head must serve the same number of query heads"
            )
        _check_choice("activation", self.activation, Activation)
        _check_choice("norm", self.norm, NormKind)
        _check_choice("norm_placement", self.norm_placement, NormPlacement)
        _check_choice("positions", self.positions, Positions)
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        for name in ("emb_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be > 0, got {self.init_std}")
        if self.positions == "rope":
            self.rope.validate()
            hd = self.head_dim or self.dim // self.n_heads
            if int(hd * self.rope.partial_rotary_factor) % 2:
                raise ConfigError(f"RoPE needs an even number of rotated dims per head, got head_dim={hd}")
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ConfigError(f"sinusoidal positions need an even dim, got {self.dim}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("rope"), dict):
            rope_known = {f.name for f in fields(RopeConfig)}
            bad = sorted(set(data["rope"]) - rope_known)
            if bad:
                raise ConfigError(f"unknown RopeConfig field(s) {bad}; known fields: {sorted(rope_known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")
