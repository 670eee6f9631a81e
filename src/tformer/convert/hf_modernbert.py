"""HF ModernBERT checkpoints (`ModernBertModel`, `ModernBertForMaskedLM`) -> tformer `Encoder`, `MaskedLM`.

ModernBERT (Warner et al. 2024) is a pre-norm encoder: RoPE with a global and a local base, a GLU
FFN, alternating global and sliding-window layers, no biases, LayerNorm without bias, an
embedding norm and a final norm; layer 0 has no attention pre-norm. Its config maps onto
ModelConfig fields (global_every, sliding_window, rope_local_theta, first_attn_norm, head_bias,
pooler).

The HF names live only here. Tensors change in one way: the FFN's fused `Wi` holds the
activated half then the gate half, split into our w1 (activated) and w3 rows. The MLM
`decoder.weight` is the tied word embedding and is not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.config import ConfigError, ModelConfig, RopeConfig
from tformer.io import CheckpointError, load_state_dict_strict, read_json, read_safetensors_dir
from tformer.models.build import reset_buffers
from tformer.models.encoder import Encoder, MaskedLM

_GATED = {"gelu": "geglu_exact", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "silu": "swiglu"}
COPY, W1, W3 = "copy", "w1", "w3"  # w1 / w3: the first / second half of the rows of HF's Wi

# (our name, HF name, how the tensor changes); `\1`, `\2` are our name's groups
_KEYS = [
    (r"tok_emb\.weight", "embeddings.tok_embeddings.weight", COPY),
    (r"emb_norm\.(weight|bias)", r"embeddings.norm.\1", COPY),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.attn_norm.\2", COPY),
    (r"layers\.(\d+)\.attn\.wqkv\.(weight|bias)", r"layers.\1.attn.Wqkv.\2", COPY),  # q | k | v rows, as ours
    (r"layers\.(\d+)\.attn\.wo\.(weight|bias)", r"layers.\1.attn.Wo.\2", COPY),
    (r"layers\.(\d+)\.ffn_norm\.(weight|bias)", r"layers.\1.mlp_norm.\2", COPY),
    (r"layers\.(\d+)\.ffn\.w1\.(weight|bias)", r"layers.\1.mlp.Wi.\2", W1),
    (r"layers\.(\d+)\.ffn\.w3\.(weight|bias)", r"layers.\1.mlp.Wi.\2", W3),
    (r"layers\.(\d+)\.ffn\.w2\.(weight|bias)", r"layers.\1.mlp.Wo.\2", COPY),
    (r"norm\.(weight|bias)", r"final_norm.\1", COPY),
]
_HEAD_KEYS = [
    (r"head\.dense\.(weight|bias)", r"head.dense.\1", COPY),
    (r"head\.norm\.(weight|bias)", r"head.norm.\1", COPY),
    (r"head\.bias", "decoder.bias", COPY),
]
CLASSES = (Encoder, MaskedLM)
_SKIP = re.compile(r"(^decoder\.weight|inv_freq)$")  # the tied embedding; RoPE buffers


def _layer_pattern(hf: dict[str, Any]) -> int:
    """global_attn_every_n_layers, checked against `layer_types` where the config lists them."""
    n_layers, every = hf["num_hidden_layers"], hf.get("global_attn_every_n_layers", 3)
    kinds = hf.get("layer_types")
    if kinds is not None:
        expected = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)]
        if list(kinds) != expected:
            raise ConfigError(f"modernbert: layer_types {kinds} are not every {every}-th layer global "
                              "(global_attn_every_n_layers); only that pattern is supported")  # fmt: skip
    return every


def _theta(hf: dict[str, Any], kind: str, legacy: str, default: float) -> float:
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"modernbert: rope_type={params['rope_type']!r} ({kind}) is not supported; only 'default'")
    return float(params.get("rope_theta", hf.get(legacy, default)))


def modernbert_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig (architecture "encoder", pre-norm, RoPE, local/global layers) from a ModernBERT
    `config.json` dict (transformers 4.x fields or 5.x `layer_types` / `rope_parameters`)."""
    act = hf.get("hidden_activation", "gelu")
    if act not in _GATED:
        raise ConfigError(f"modernbert: hidden_activation={act!r} is not supported; supported: {sorted(_GATED)}")
    if hf.get("classifier_activation", "gelu") != act:
        raise ConfigError(f"modernbert: classifier_activation={hf['classifier_activation']!r} differs from "
                          f"hidden_activation={act!r}; tformer's MLM head uses the FFN's activation")  # fmt: skip
    if not hf.get("decoder_bias", True):
        raise ConfigError("modernbert: decoder_bias=false is not supported (the MLM head has an output bias)")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    return ModelConfig(
        architecture="encoder",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        activation=_GATED[act],
        norm="layernorm",
        norm_eps=hf.get("norm_eps", 1e-5),
        norm_bias=hf.get("norm_bias", False),
        norm_placement="pre",
        positions="rope",
        rope=RopeConfig(theta=_theta(hf, "full_attention", "global_rope_theta", 160000.0)),
        rope_local_theta=_theta(hf, "sliding_attention", "local_rope_theta", 10000.0),
        qkv_bias=attn_bias,
        out_bias=attn_bias,
        ffn_bias=mlp_bias,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        sliding_window=hf.get("local_attention", 128) // 2,  # HF: |q - k| <= local_attention // 2
        global_every=_layer_pattern(hf),
        first_attn_norm=False,
        head_bias=hf.get("classifier_bias", False),
        pooler=False,
        emb_dropout=hf.get("embedding_dropout", 0.0),
        attn_dropout=hf.get("attention_dropout", 0.0),
        resid_dropout=hf.get("mlp_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
        scale_residual_init=False,
    )


def modernbert_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """HF-named tensors -> our names for `model` (an Encoder or MaskedLM); CheckpointError naming
    missing or unexpected tensors. An Encoder ignores an MLM checkpoint's head."""
    wrapped = not isinstance(model, Encoder)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    out, used, missing = {}, set(), []
    for name in model.state_dict():
        in_head = name.startswith("head.")
        inner = name.removeprefix("encoder.") if wrapped and not in_head else name
        for pattern, template, op in _HEAD_KEYS if in_head else _KEYS:
            if m := re.fullmatch(pattern, inner):
                hf_name = ("" if in_head else prefix) + m.expand(template)
                break
        else:
            raise RuntimeError(f"no HF name for parameter {name!r} of a ModernBERT model: extend the key map")
        used.add(hf_name)
        if hf_name not in tensors:
            missing.append(hf_name)
        elif op == COPY:
            out[name] = tensors[hf_name]
        else:
            out[name] = tensors[hf_name].chunk(2, dim=0)[0 if op == W1 else 1]
    ignored = _SKIP if wrapped else re.compile(rf"{_SKIP.pattern}|^(head|decoder)\.")
    unexpected = sorted(k for k in tensors if k not in used and not ignored.search(k))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing tensors {missing[:8]}, "
                              f"unexpected tensors {unexpected[:8]}")  # fmt: skip
    return out


def load_hf_modernbert(path: str | Path, model_class: type[nn.Module] = Encoder, device="cpu",
                       dtype: torch.dtype | None = None):
    """An `Encoder` or `MaskedLM` from an HF ModernBERT directory (config.json + safetensors) holding
    ModernBertModel or ModernBertForMaskedLM weights."""  # fmt: skip
    if model_class not in CLASSES:
        raise ValueError(f"model_class must be one of {[c.__name__ for c in CLASSES]}, got {model_class!r}")
    path = Path(path)
    try:
        cfg = modernbert_config_from_hf(read_json(path / "config.json"))
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    with torch.device("meta"):
        model = model_class(cfg)
    tensors = modernbert_state_dict_from_hf(read_safetensors_dir(path), model, str(path))
    load_state_dict_strict(model, tensors, str(path))
    model.tie_weights()
    reset_buffers(model, "cpu")
    return model.to(device=device, dtype=dtype).eval()
