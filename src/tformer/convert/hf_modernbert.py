"""HF ModernBERT checkpoints (`ModernBertModel`, `ModernBertForMaskedLM`) <-> tformer `Encoder`, `MaskedLM`:
`load_hf_modernbert` reads them, `save_hf_modernbert` writes them.

ModernBERT (Warner et al. 2024) is a pre-norm encoder: RoPE with a global and a local base, a GLU
FFN, alternating global and sliding-window layers, no biases, LayerNorm without bias, an
embedding norm and a final norm; layer 0 has no attention pre-norm. Its config maps onto
ModelConfig fields (global_every, sliding_window, rope_local_theta, first_attn_norm, head_bias,
pooler).

The HF names live only here, one key map used in both directions. Tensors change in one way: the
FFN's fused `Wi` holds the activated half then the gate half, our w1 (activated) and w3 rows. The
MLM `decoder.weight` is the tied word embedding and is neither read nor written (HF ties it on load),
unless `tie_word_embeddings` is false: then it is the head's own `output`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.config import ConfigError, ModelConfig, RopeConfig
from tformer.convert.hf_dir import write_hf_dir
from tformer.io import CheckpointError, load_state_dict_strict, read_json
from tformer.io import read_safetensors_dir
from tformer.models.build import reset_buffers
from tformer.models.encoder import Encoder, MaskedLM

_GATED = {"gelu": "geglu_exact", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "silu": "swiglu"}
_GATED_TO_HF = {"geglu_exact": "gelu", "geglu": "gelu_pytorch_tanh", "swiglu": "silu"}
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
    (r"head\.output\.weight", "decoder.weight", COPY),  # untied only
]
CLASSES = (Encoder, MaskedLM)
HF_CLASSES = {Encoder: "ModernBertModel", MaskedLM: "ModernBertForMaskedLM"}
_SKIP = re.compile(r"(^decoder\.weight|inv_freq)$")  # the tied embedding (read when untied); RoPE buffers


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


def is_modernbert_shaped(cfg: ModelConfig) -> bool:
    """Whether an encoder exports as ModernBERT rather than BERT: rotary positions or local/global
    layers, which BERT (learned absolute positions, global attention) cannot hold."""
    return cfg.positions == "rope" or cfg.global_every is not None


_NOT_SHAPED = "modernbert export: this encoder is not ModernBERT-shaped"
_NEEDS = {  # field -> what ModernBERT has, for the fields the config dict cannot be written without
    "activation": f"a GLU FFN, one of {sorted(_GATED_TO_HF)}",
    "positions": "'rope'",
    "sliding_window": "the window of the local layers",
    "global_every": "every n-th layer global",
}


def modernbert_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ModernBertConfig dict for `cfg` (transformers 5.x `layer_types` / `rope_parameters` and the 4.x
    fields beside them); ConfigError naming the fields ModernBERT's architecture cannot hold (the
    dict must read back to `cfg`; rope_local_theta None reads back as rope.theta, the same model)."""
    has = {"activation": cfg.activation in _GATED_TO_HF, "positions": cfg.positions == "rope",
           "sliding_window": cfg.sliding_window is not None, "global_every": cfg.global_every is not None}
    if not all(has.values()):
        raise ConfigError(f"{_NOT_SHAPED}: " + ", ".join(
            f"{n}={getattr(cfg, n)!r} (ModernBERT: {_NEEDS[n]})" for n, ok in has.items() if not ok))  # fmt: skip
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope.theta
    act, every = _GATED_TO_HF[cfg.activation], cfg.global_every
    hf = dict(
        model_type="modernbert",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_activation=act,
        classifier_activation=act,
        norm_eps=cfg.norm_eps,
        norm_bias=cfg.norm_bias,
        max_position_embeddings=cfg.max_seq_len,
        layer_types=["sliding_attention" if i % every else "full_attention" for i in range(cfg.n_layers)],
        global_attn_every_n_layers=every,
        local_attention=2 * cfg.sliding_window,  # HF: |q - k| <= local_attention // 2
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope.theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        global_rope_theta=cfg.rope.theta,
        local_rope_theta=local_theta,
        attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.ffn_bias,
        classifier_bias=cfg.head_bias,
        decoder_bias=True,
        embedding_dropout=cfg.emb_dropout,
        attention_dropout=cfg.attn_dropout,
        mlp_dropout=cfg.resid_dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,  # tied: the MLM head reads tok_emb
    )  # fmt: skip
    back, expected = modernbert_config_from_hf(hf), cfg.replace(rope_local_theta=local_theta)
    differ = [f"{f.name}={getattr(cfg, f.name)!r} (ModernBertConfig holds {getattr(back, f.name)!r})"
              for f in dataclasses.fields(cfg)
              if f.name != "scale_residual_init" and getattr(back, f.name) != getattr(expected, f.name)]  # fmt: skip
    if differ:
        raise ConfigError(f"{_NOT_SHAPED}: " + ", ".join(differ))
    return hf


def _hf_names(model: nn.Module, prefix: str) -> dict[str, tuple[str, str]]:
    """our parameter name -> (its HF name, op) in a checkpoint of `model` (an Encoder or MaskedLM);
    `prefix` goes before the encoder's HF names ("model." in ModernBertForMaskedLM)."""
    wrapped = not isinstance(model, Encoder)  # the encoder's names start with "encoder."
    out = {}
    for name in model.state_dict():
        in_head = name.startswith("head.")
        inner = name.removeprefix("encoder.") if wrapped and not in_head else name
        for pattern, template, op in _HEAD_KEYS if in_head else _KEYS:
            if m := re.fullmatch(pattern, inner):
                out[name] = (("" if in_head else prefix) + m.expand(template), op)
                break
        else:
            raise RuntimeError(f"no HF name for parameter {name!r} of a ModernBERT model: extend the key map")
    return out


def modernbert_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """HF-named tensors -> our names for `model` (an Encoder or MaskedLM); CheckpointError naming
    missing or unexpected tensors. An Encoder ignores an MLM checkpoint's head."""
    wrapped = not isinstance(model, Encoder)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    out, used, missing = {}, set(), []
    for name, (hf_name, op) in _hf_names(model, prefix).items():
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


def modernbert_state_dict_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s tensors (an Encoder or MaskedLM) under the names of its HF class (`HF_CLASSES`);
    w1 and w3 rows are concatenated into HF's Wi."""
    tensors = model.state_dict()
    out, halves = {}, {}
    for name, (hf_name, op) in _hf_names(model, "" if isinstance(model, Encoder) else "model.").items():
        if op == COPY:
            out[hf_name] = tensors[name].contiguous()
        else:
            halves.setdefault(hf_name, {})[op] = tensors[name]
    out.update((hf_name, torch.cat([h[W1], h[W3]])) for hf_name, h in halves.items())  # Wi rows: w1 | w3
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


def _token_ids(tokenizer) -> dict[str, int | None]:
    """config.json's special-token ids: [CLS] / [SEP] (bos / eos where the vocabulary has none) and
    pad; null without a tokenizer, where transformers would fill in ModernBERT's 50k-vocabulary ids."""
    keys = ("pad_token_id", "bos_token_id", "cls_token_id", "eos_token_id", "sep_token_id")
    if tokenizer is None:
        return dict.fromkeys(keys)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    cls = cls if cls is not None else tokenizer.bos_id
    sep = sep if sep is not None else tokenizer.eos_id
    return dict(zip(keys, (tokenizer.pad_id, cls, cls, sep, sep)))


def save_hf_modernbert(model: nn.Module, path: str | Path, tokenizer=None,
                       max_shard_bytes: int | None = None) -> Path:
    """Write `model` (an Encoder or MaskedLM) as an HF directory (config.json, model.safetensors or shards
    of at most `max_shard_bytes` and, with `tokenizer`, its files) that `ModernBertModel` /
    `ModernBertForMaskedLM` `from_pretrained` loads with the same outputs. The directory is written
    through `tformer.io.atomic_path`."""  # fmt: skip
    from tformer.checkpoint import tokenizer_for

    if type(model) not in HF_CLASSES:
        raise ValueError(f"save_hf_modernbert writes {[c.__name__ for c in CLASSES]}, got {type(model).__name__}")
    hf = modernbert_config_to_hf(model.config)  # fails before anything is written
    tokenizer = tokenizer_for(model, tokenizer)
    hf.update(architectures=[HF_CLASSES[type(model)]], **_token_ids(tokenizer),
              dtype=str(next(model.parameters()).dtype).removeprefix("torch."))  # fmt: skip
    tensors = modernbert_state_dict_to_hf(model)
    return write_hf_dir(path, tensors, hf, tokenizer, max_shard_bytes)
