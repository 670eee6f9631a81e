"""HF BERT checkpoints (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`, the classifiers) <-> tformer
`Encoder`, `MaskedLM`, `Pretraining`, ...: `load_hf_bert` reads them, `save_hf_bert` writes them.

The HF names live only here, one key map used in both directions. Tensors change in one way: the
query | key | value projections (and biases) are concatenated into our wqkv rows. The models with
heads prefix the encoder's names with `bert.`; the MLM decoder weight is the tied word embedding
and is neither read nor written (HF ties it on load), unless `tie_word_embeddings` is false: then it
is the head's own `output`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.config import ConfigError, ModelConfig
from tformer.convert.hf_dir import write_hf_dir
from tformer.io import CheckpointError, load_state_dict_strict, read_json
from tformer.io import read_safetensors_dir
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
_ACTS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

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
    (r"head\.output\.weight", "cls.predictions.decoder.weight"),  # untied only
    (r"nsp\.(weight|bias)", r"cls.seq_relationship.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
    (r"qa\.(weight|bias)", r"qa_outputs.\1"),
]
_HEADS = ("head.", "nsp.", "classifier.", "qa.")
CLASSES = (Encoder, MaskedLM, Pretraining, SequenceClassifier, TokenClassifier, QuestionAnswering)
LABELLED = (SequenceClassifier, TokenClassifier)  # built with n_labels (config.json's id2label)
HF_CLASSES = {Encoder: "BertModel", MaskedLM: "BertForMaskedLM", Pretraining: "BertForPreTraining",
              SequenceClassifier: "BertForSequenceClassification", TokenClassifier: "BertForTokenClassification",
              QuestionAnswering: "BertForQuestionAnswering"}  # fmt: skip
# HF buffers, and the MLM decoder, which holds the tied embedding (when tied) and (again) cls.predictions.bias
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


def _hf_names(model: nn.Module, prefix: str) -> dict[str, list[str]]:
    """our parameter name -> its HF name(s) (query, key, value for wqkv) in a checkpoint of `model`."""
    wrapped = not isinstance(model, Encoder)  # the encoder's names start with "encoder."
    out = {}
    for name in model.state_dict():
        in_head = name.startswith(_HEADS)
        inner = name.removeprefix("encoder.") if wrapped and not in_head else name
        rules = _HEAD_KEYS if in_head else _KEYS
        hf_prefix = "" if in_head else prefix
        for pattern, template in rules:
            if m := re.fullmatch(pattern, inner):
                templates = template if isinstance(template, tuple) else (template,)
                out[name] = [hf_prefix + m.expand(t) for t in templates]
                break
        else:
            raise RuntimeError(f"no HF name for parameter {name!r} of a BERT model: extend the key map")
    return out


def bert_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """HF-named tensors -> our names for `model` (an Encoder, MaskedLM or Pretraining);
    CheckpointError naming missing or unexpected tensors."""
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    out, used, missing = {}, set(), []
    for name, names in _hf_names(model, prefix).items():
        missing += [n for n in names if n not in tensors]
        used.update(names)
        if all(n in tensors for n in names):
            out[name] = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
    unexpected = sorted(k for k in tensors if k not in used and not _SKIP.search(k))
    untied_bias = "cls.predictions.decoder.bias"
    if "head.output.weight" in out and untied_bias in tensors:  # untied, HF's decoder keeps a bias of its own
        out["head.bias"] = tensors[untied_bias]
    if isinstance(model, MaskedLM):  # BertForMaskedLM has no pooler; a BertModel checkpoint may bring one
        unexpected = [k for k in unexpected if ".pooler." not in "." + k]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing tensors {missing[:8]}, "
                              f"unexpected tensors {unexpected[:8]}")  # fmt: skip
    return out


def bert_state_dict_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s tensors (one of `CLASSES`) under the names of its HF class (`HF_CLASSES`)."""
    tensors = model.state_dict()
    out = {}
    for name, names in _hf_names(model, "" if isinstance(model, Encoder) else "bert.").items():
        parts = tensors[name].chunk(len(names)) if len(names) > 1 else (tensors[name],)  # wqkv: q | k | v
        out.update((n, t.contiguous()) for n, t in zip(names, parts))
    if "head.output.weight" in tensors:  # untied: HF's decoder Linear adds its own bias, not cls.predictions.bias
        out["cls.predictions.decoder.bias"] = tensors["head.bias"].clone()  # a tensor of its own on disk
    return out


def bert_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A BertConfig dict for `cfg`; ConfigError naming the fields that BERT's architecture cannot hold
    (the dict must read back to `cfg`, dropout aside: HF has one hidden_dropout_prob)."""
    if cfg.activation not in _ACTS_TO_HF:
        raise ConfigError(f"bert export: this encoder is not BERT-shaped: activation {cfg.activation!r} has no "
                          f"BERT equivalent (BERT's: {sorted(_ACTS_TO_HF)})")  # fmt: skip
    hf = dict(
        model_type="bert",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act=_ACTS_TO_HF[cfg.activation],
        layer_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.resid_dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        position_embedding_type="absolute",
    )
    back = bert_config_from_hf(hf)
    differ = [f.name for f in dataclasses.fields(cfg) if f.name != "emb_dropout" and getattr(back, f.name) !=
              getattr(cfg, f.name)]  # fmt: skip
    if differ:
        raise ConfigError(f"bert export: this encoder is not BERT-shaped: {differ} differ from what a BertConfig "
                          "can hold (HF export writes the BERT family only)")  # fmt: skip
    return hf


def save_hf_bert(model: nn.Module, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None,
                 labels: list[str] | None = None) -> Path:
    """Write `model` (one of `CLASSES`) as an HF directory (config.json, model.safetensors or shards of at
    most `max_shard_bytes` and, with `tokenizer`, its files) that its HF class (`HF_CLASSES`)
    `from_pretrained` loads with the same outputs; `labels` name a classifier's outputs (id2label). The
    directory is written through `tformer.io.atomic_path`."""
    from tformer.checkpoint import tokenizer_for

    if type(model) not in HF_CLASSES:
        raise ValueError(f"save_hf_bert writes {[c.__name__ for c in CLASSES]}, got {type(model).__name__}")
    if getattr(model, "pooling", "cls") != "cls":
        raise ValueError("this classifier reads the mean of its tokens (pooling='mean'); HF's "
                         "BertForSequenceClassification reads the pooled [CLS] only: fine-tune with --pooling cls "
                         "to export it to HF, or keep the tformer checkpoint")
    hf = bert_config_to_hf(model.config)  # fails before anything is written
    tokenizer = tokenizer_for(model, tokenizer)
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0  # BERT's [PAD]
    hf.update(architectures=[HF_CLASSES[type(model)]], pad_token_id=pad,
              dtype=str(next(model.parameters()).dtype).removeprefix("torch."))  # fmt: skip
    if isinstance(model, LABELLED):
        n_labels = model.classifier.out_features
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(n_labels)]
        if len(names) != n_labels:
            raise ValueError(f"{len(names)} labels for a classifier of {n_labels} outputs")
        hf.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    tensors = bert_state_dict_to_hf(model)
    return write_hf_dir(path, tensors, hf, tokenizer, max_shard_bytes)


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
