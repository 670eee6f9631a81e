"""HF BERT checkpoints (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`) -> tformer `Encoder`,
`MaskedLM`, `Pretraining`.

The HF names live only here. Tensors change in one way: the query | key | value projections
(and biases) are concatenated into our wqkv rows. The models with heads prefix the encoder's
names with `bert.`; the MLM decoder weight is the tied word embedding and is not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.config import ConfigError, ModelConfig
from tformer.io import CheckpointError, load_state_dict_strict, read_json, read_safetensors_dir
from tformer.models.build import reset_buffers
from tformer.models.encoder import (
    Encoder,
    MaskedLM,
    Pretraining,
    QuestionAnswering,
    SequenceClassifier,
    TokenClassifier,
)

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# (our name, HF name or (q, k, v) names); `\1`, `\2` are our name's groups
_KEYS = [
    (r"tok_emb\.weight", "embeddings.word_embeddings.weight"),
    (r"pos_emb\.weight", "embeddings.position_embeddings.weight"),
    (r"seg_emb\.weight", "embeddings.token_type_embeddings.weight"),
    (r"emb_norm\.(weight|bias)", r"embeddings.LayerNorm.\1"),
    (r"layers\.(\d+)\.attn\.wqkv\.(weight|bias)",
     tuple(rf"encoder.layer.\1.attention.self.{p}.\2" for p in ("query", "key", "value"))),  # fmt: skip
    (r"layers\.(\d+)\.attn\.wo\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"encoder.layer.\1.attention.output.LayerNorm.\2"),
    (r"layers\.(\d+)\.ffn\.w1\.(weight|bias)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"layers\.(\d+)\.ffn\.w2\.(weight|bias)", r"encoder.layer.\1.output.dense.\2"),
    (r"layers\.(\d+)\.ffn_norm\.(weight|bias)", r"encoder.layer.\1.output.LayerNorm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
]
_HEAD_KEYS = [
    (r"head\.dense\.(weight|bias)", r"cls.predictions.transform.dense.\1"),
    (r"head\.norm\.(weight|bias)", r"cls.predictions.transform.LayerNorm.\1"),
    (r"head\.bias", "cls.predictions.bias"),
    (r"nsp\.(weight|bias)", r"cls.seq_relationship.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"qa\.(weight|bias)", r"qa_outputs.\1"),
]
_HEADS = ("head.", "nsp.", "classifier.", "qa.")
CLASSES = (Encoder, MaskedLM, Pretraining, SequenceClassifier, TokenClassifier, QuestionAnswering)
LABELLED = (SequenceClassifier, TokenClassifier)  # built with n_labels (config.json's id2label)
# HF buffers, and the MLM decoder, which holds the tied embedding and (again) cls.predictions.bias
_SKIP = re.compile(r"(position_ids|token_type_ids|cls\.predictions\.decoder\.(weight|bias))$")


def bert_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig (architecture "encoder", post-norm) from a BERT `config.json` dict."""
    for key, ok in (("position_embedding_type", "absolute"), ("is_decoder", False), ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"bert: {key}={hf[key]!r} is not supported; only {key}={ok!r} is")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ConfigError(f"bert: hidden_act={act!r} is not supported; supported values: {sorted(_ACTS)}")
    hidden_drop = hf.get("hidden_dropout_prob", 0.1)
    return ModelConfig(
        architecture="encoder",
        vocab_size=hf["vocab_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        activation=_ACTS[act],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_placement="post",
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_seq_len=hf["max_position_embeddings"],
        emb_dropout=hidden_drop,
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        resid_dropout=hidden_drop,
        init_std=hf.get("initializer_range", 0.02),
        scale_residual_init=False,
    )


def bert_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """HF-named tensors -> our names for `model` (an Encoder, MaskedLM or Pretraining);
    CheckpointError naming missing or unexpected tensors."""
    wrapped = not isinstance(model, Encoder)  # the encoder's names start with "encoder."
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    out, used, missing = {}, set(), []
    for name in model.state_dict():
        in_head = name.startswith(_HEADS)
        inner = name.removeprefix("encoder.") if wrapped and not in_head else name
        rules = _HEAD_KEYS if in_head else _KEYS
        hf_prefix = "" if in_head else prefix
        for pattern, template in rules:
            if m := re.fullmatch(pattern, inner):
                names = [hf_prefix + m.expand(t) for t in (template if isinstance(template, tuple) else (template,))]
                break
        else:
            raise RuntimeError(f"no HF name for parameter {name!r} of a BERT model: extend the key map")
        missing += [n for n in names if n not in tensors]
        used.update(names)
        if all(n in tensors for n in names):
            out[name] = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
    unexpected = sorted(k for k in tensors if k not in used and not _SKIP.search(k))
    if isinstance(model, MaskedLM):  # BertForMaskedLM has no pooler; a BertModel checkpoint may bring one
        unexpected = [k for k in unexpected if ".pooler." not in "." + k]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing tensors {missing[:8]}, "
                              f"unexpected tensors {unexpected[:8]}")  # fmt: skip
    return out


def load_hf_bert(path: str | Path, model_class: type[nn.Module] = Encoder, device="cpu",
                 dtype: torch.dtype | None = None):
    """A `model_class` (one of `CLASSES`) from an HF BERT directory (config.json + safetensors) holding
    that model's weights (BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
    BertForTokenClassification, BertForQuestionAnswering)."""
    if model_class not in CLASSES:
        raise ValueError(f"model_class must be one of {[c.__name__ for c in CLASSES]}, got {model_class!r}")
    path = Path(path)
    hf = read_json(path / "config.json")
    try:
        cfg = bert_config_from_hf(hf)
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    n_labels = len(hf.get("id2label") or {}) or 2  # transformers' default num_labels
    with torch.device("meta"):
        model = model_class(cfg, n_labels) if model_class in LABELLED else model_class(cfg)
    tensors = bert_state_dict_from_hf(read_safetensors_dir(path), model, str(path))
    load_state_dict_strict(model, tensors, str(path))
    model.tie_weights()
    reset_buffers(model, "cpu")
    return model.to(device=device, dtype=dtype).eval()
