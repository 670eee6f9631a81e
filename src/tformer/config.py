"""Model configuration: one typed, validated description of a transformer.

Every architectural choice is a field with a default; a model family is a preset
(`tformer.presets`) that fills these fields, never a branch on its name.

Every config dataclass (these and `TrainConfig`) checks its fields' types in one place,
`tformer.fields.check_value`, whether they come from Python, JSON, TOML or the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from tformer.fields import ConfigError, check_fields, check_values
from tformer.subconfigs import AttentionConfig, MLAConfig, MoEConfig, SSDConfig  # noqa: F401 (re-exported)

Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_exact"]
NormKind = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
Positions = Literal["rope", "learned", "sinusoidal", "alibi", "t5", "none"]
RopeScaling = Literal["none", "linear", "dynamic", "yarn", "llama3"]
Architecture = Literal["decoder", "encoder", "encoder_decoder"]

# gated FFN -> the activation of its gate; "geglu_exact" gates with the erf GELU (ModernBERT)
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_tanh", "geglu_exact": "gelu"}


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

    def __post_init__(self) -> None:
        check_fields(self, "rope.")

    def validate(self) -> None:
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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (Peng et al. 2023; DeepSeek's
    `yarn_get_mscale`); 1 when the context is not extended (factor <= 1)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def deepseek_yarn_scales(factor: float, mscale: float, mscale_all_dim: float, qk_head_dim: int) -> tuple[float, float]:
    """DeepSeek's YaRN `rope_scaling` {mscale, mscale_all_dim} -> (rope.attention_factor, mla.softmax_scale).

    The cos/sin factor is mscale(f, mscale) / mscale(f, mscale_all_dim) (HF `_compute_yarn_parameters`;
    1 when the two are equal, as in every DeepSeek release) and the softmax scale is
    qk_head_dim^-0.5 * mscale(f, mscale_all_dim)^2 (HF deepseek_v3 `yarn_apply_mscale`), with
    qk_head_dim = nope_dim + rope_dim. The one place this math lives: presets and converters call it.
    """
    m_all = yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor, mscale) / m_all, qk_head_dim**-0.5 * m_all * m_all


# The fields a ModelConfig derives when they are None, and from what.
DERIVED = {"n_kv_heads": "n_heads (MHA)", "head_dim": "dim // n_heads", "ffn_dim": "4 * dim"}


@dataclass
class ModelConfig:
    """A decoder-only (default) or encoder-only transformer. Sizes use our names: dim, n_layers, n_heads, ...

    n_kv_heads, head_dim and ffn_dim left at None are derived (see `DERIVED`) and stay derived:
    `replace` derives them again from the new dim / n_heads. A value given explicitly is kept,
    except that an explicit n_kv_heads follows a change of n_heads (`_kv_heads_for`).
    """

    architecture: Architecture = "decoder"  # "encoder": bidirectional, hidden states out (BERT)
    vocab_size: int = 50257
    type_vocab_size: int = 0  # encoder segment (token type) embeddings; 0: none
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
    moe: MoEConfig | None = None  # None: every layer has the dense FFN
    mla: MLAConfig | None = None  # None: standard attention (MHA/GQA/MQA)
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # pattern, per-layer windows, approx
    ssd: SSDConfig | None = None  # None: every layer attends; else Mamba-2 mixers in ssd.layers
    # encoder-decoder fields (models/encoder_decoder.py: T5, the original Transformer)
    n_decoder_layers: int | None = None  # decoder stack depth; None: n_layers
    rel_buckets: int = 32  # positions "t5": relative-position buckets (the encoder gives half to each direction)
    rel_max_distance: int = 128  # positions "t5": distances from here on share the last bucket
    attn_scale: float | None = None  # attention logits q.k * attn_scale; None: 1/sqrt(head_dim); T5: 1.0
    scale_embeddings: bool = False  # token embeddings * sqrt(dim) (Vaswani et al. 2017, 3.4)
    scale_output: bool = False  # final hidden states * dim^-0.5 before the output head (T5 v1.0)
    sinusoid_split: bool = False  # sinusoids laid out [sin | cos] by halves (Marian), not interleaved
    # Encoder attention pattern (ModernBERT, Warner et al. 2024). An encoder layer is local when
    # sliding_window is set: its queries see keys at most sliding_window positions away on either
    # side (|q - k| <= w; ModernBERT's local_attention 128 is w = 64). With global_every, layer i is
    # global (whole sequence) when i % global_every == 0, local otherwise; local layers rotate with
    # rope_local_theta (None: rope.theta).
    global_every: int | None = None
    rope_local_theta: float | None = None
    first_attn_norm: bool = True  # False: layer 0 has no attention pre-norm (the embedding norm serves)
    head_bias: bool = True  # the masked-LM head's dense layer has a bias (BERT) or not (ModernBERT)
    pooler: bool = True  # an encoder has BERT's [CLS] pooler (dense + tanh); ModernBERT has none
    _derived: ClassVar[frozenset[str]] = frozenset()  # per instance: which of DERIVED were None

    def __post_init__(self) -> None:
        check_fields(self)
        self._derived = frozenset(name for name in DERIVED if getattr(self, name) is None)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        self.validate()
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
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
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.architecture == "encoder" and (self.moe is not None or self.mla is not None):
            raise ConfigError("an encoder has dense attention and FFNs: set moe and mla to None")
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
            hd = self.mla.rope_dim if self.mla is not None else self.head_dim or self.dim // self.n_heads
            if int(hd * self.rope.partial_rotary_factor) % 2:
                raise ConfigError(f"RoPE needs an even number of rotated dims per head, got head_dim={hd}")
        if self.moe is not None:
            self.moe.validate()
            if self.activation not in GATED_ACTIVATIONS:
                raise ConfigError(
                    f"MoE experts are gated FFNs: set activation to 'swiglu' or 'geglu' (got {self.activation!r})"
                )
        self.attention.validate()
        self.attention.check_approx(self)
        self.attention.check_model(self)
        if self.ssd is not None:
            self.ssd.validate()
            self.ssd.check_model(self.dim, self.n_layers)
            if self.architecture != "decoder" or self.norm_placement != "pre":
                raise ConfigError("SSD layers (ssd) are pre-norm decoder blocks: set architecture='decoder' and "
                                  "norm_placement='pre', or ssd=None")
        if self.mla is not None:
            self.mla.validate()
            if self.positions not in ("rope", "none"):
                raise ConfigError(f"MLA supports positions 'rope' or 'none', got {self.positions!r}")
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ConfigError(f"sinusoidal positions need an even dim, got {self.dim}")
        self._validate_encoder_decoder()

    def _validate_encoder_decoder(self) -> None:
        """The encoder-decoder fields: their ranges, and that only `architecture="encoder_decoder"` sets them."""
        if self.architecture == "encoder_decoder":
            if self.moe is not None or self.mla is not None or self.sliding_window is not None:
                raise ConfigError("an encoder-decoder has dense, full attention and FFNs: "
                                  "set moe, mla and sliding_window to None")
            if self.positions not in ("t5", "sinusoidal", "learned", "none"):
                raise ConfigError(f"an encoder-decoder takes positions 't5', 'sinusoidal', 'learned' or 'none', "
                                  f"got {self.positions!r}")
        else:
            # attn_scale too: the decoder's swapped-in decode kernels (inference/fused.py) assume 1/sqrt(D)
            own = {"n_decoder_layers": None, "scale_embeddings": False, "scale_output": False,
                   "sinusoid_split": False, "attn_scale": None}
            for name, default in own.items():
                if getattr(self, name) != default:
                    raise ConfigError(f"{name} is an encoder-decoder field: set architecture='encoder_decoder' "
                                      f"or leave {name}={default!r}")
            if self.positions == "t5" and self.architecture != "decoder":
                raise ConfigError("positions='t5' (relative position bias) needs architecture='encoder_decoder' "
                                  "or 'decoder'")
        if self.n_decoder_layers is not None and self.n_decoder_layers <= 0:
            raise ConfigError(f"n_decoder_layers must be a positive integer or None, got {self.n_decoder_layers!r}")
        if self.positions == "t5" and (self.rel_buckets < 4 or self.rel_buckets % 2):
            raise ConfigError(f"rel_buckets must be an even integer >= 4, got {self.rel_buckets}")
        if self.positions == "t5" and self.rel_max_distance <= self.rel_buckets // 2:
            raise ConfigError(f"rel_max_distance={self.rel_max_distance} must exceed rel_buckets // 2 = "
                              f"{self.rel_buckets // 2} (the distances with a bucket each)")
        if self.attn_scale is not None and self.attn_scale <= 0:
            raise ConfigError(f"attn_scale must be > 0 or None (1/sqrt(head_dim)), got {self.attn_scale}")
        if self.sinusoid_split and self.positions != "sinusoidal":
            raise ConfigError(f"sinusoid_split needs positions='sinusoidal', got {self.positions!r}")
        self._validate_local_attention()

    @property
    def decoder_layers(self) -> int:
        """The decoder stack's depth: n_decoder_layers, else n_layers."""
        return self.n_decoder_layers or self.n_layers

    def _validate_local_attention(self) -> None:
        encoder_only = {"global_every": self.global_every is not None, "first_attn_norm": not self.first_attn_norm}
        for name, used in encoder_only.items():
            if used and self.architecture != "encoder":
                raise ConfigError(f"{name}={getattr(self, name)!r} is implemented by encoders only: "
                                  "set architecture='encoder'")  # fmt: skip
        if self.global_every is not None:
            if self.global_every <= 0:
                raise ConfigError(f"global_every must be a positive integer or None, got {self.global_every!r}")
            if self.sliding_window is None:
                raise ConfigError("global_every needs sliding_window, the window of the local layers between "
                                  "global ones")  # fmt: skip
        if self.rope_local_theta is not None:
            if self.rope_local_theta <= 0:
                raise ConfigError(f"rope_local_theta must be > 0 or None, got {self.rope_local_theta}")
            if self.positions != "rope" or self.sliding_window is None:
                raise ConfigError("rope_local_theta is the RoPE base of local layers: it needs positions='rope' "
                                  "and sliding_window set")
        if not self.first_attn_norm and self.norm_placement != "pre":
            raise ConfigError("first_attn_norm=False needs norm_placement='pre' (it drops layer 0's pre-norm)")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def rope_dim(self) -> int:
        """Dims per head that RoPE rotates (before partial_rotary_factor): MLA's rope part, or head_dim."""
        return self.mla.rope_dim if self.mla is not None else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based) has a mixture of experts instead of the dense FFN."""
        m = self.moe
        return m is not None and i >= m.first_dense and (i - m.first_dense) % m.interval == 0

    def is_ssd_layer(self, i: int) -> bool:
        """Whether layer i (0-based) mixes tokens with a Mamba-2 SSD layer instead of attention."""
        return self.ssd is not None and (self.ssd.layers is None or i in self.ssd.layers)

    def is_local_layer(self, i: int) -> bool:
        """Whether layer i (0-based) attends within `sliding_window` (every layer, unless global_every)."""
        if self.sliding_window is None:
            return False
        return self.global_every is None or i % self.global_every != 0

    def is_derived(self, name: str) -> bool:
        """Whether field `name` was left to derive (one of `DERIVED`, not given explicitly)."""
        return name in self._derived

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated again.

        Derived fields follow their inputs (`replace(dim=256)` gives head_dim 256 // n_heads); an
        explicit n_kv_heads follows n_heads (`_kv_heads_for`). A dict for rope / moe / mla changes
        only the fields it names (a dense config gets MoE layers with MoEConfig's other defaults);
        a sub-config instance or None replaces the whole.
        """
        changes = check_values(ModelConfig, changes, partial=True)
        for name in ("rope", "moe", "mla", "attention", "ssd"):
            if isinstance(changes.get(name), dict) and getattr(self, name) is not None:
                changes[name] = {**dataclasses.asdict(getattr(self, name)), **changes[name]}
        for name in self._derived - set(changes):
            changes[name] = None
        if "n_heads" in changes and "n_kv_heads" not in changes and not self.is_derived("n_kv_heads"):
            changes["n_kv_heads"] = _kv_heads_for(self.n_heads, self.n_kv_heads, changes["n_heads"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value (derived ones included), as JSON-ready dicts."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config of a dict of fields (from JSON or TOML): every field it names is explicit."""
        return cls(**check_values(cls, data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _kv_heads_for(n_heads: int, n_kv_heads: int, new_n_heads: int) -> int:
    """n_kv_heads after n_heads changes: MQA stays MQA; otherwise the query heads per KV head
    are kept when they divide the new n_heads, else attention falls back to MHA."""
    if n_kv_heads == 1:
        return 1
    group = n_heads // n_kv_heads
    return new_n_heads // group if new_n_heads % group == 0 else new_n_heads

