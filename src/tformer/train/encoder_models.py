"""Encoders with task heads (models/encoder.py) from any encoder checkpoint, and back to disk.

`load_with_head(path, cls)` builds `cls` (MaskedLM, Pretraining, SequenceClassifier, ...) from a
tformer encoder checkpoint, an HF BERT directory or an HF ModernBERT one (ModernBertModel,
ModernBertForMaskedLM): the encoder's weights always come from the checkpoint; a head comes from it
when it holds the same head (same names and shapes), else starts fresh (N(0, init_std) weights, zero
biases, as HF initialises BERT heads). So an HF `BertModel`
(all-MiniLM-L6-v2) becomes a classifier, and a masked-LM checkpoint continues into fine-tuning.

`save_with_head` writes a tformer checkpoint whose tformer.json also names the head class ("head"),
for classifiers the labels ("id2label"), and for a SequenceClassifier its pooling ("pooling": "cls"
or "mean"); `load_with_head` reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tformer.checkpoint import CONFIG_FILE, is_tformer_checkpoint, read_config, save
from tformer.io import CheckpointError, read_json, read_safetensors_dir
from tformer.models.build import reset_buffers
from tformer.models.encoder import (
    Encoder,
    MaskedLM,
    Pretraining,
    QuestionAnswering,
    SequenceClassifier,
    TokenClassifier,
)

HEADS = {c.__name__: c for c in (Encoder, MaskedLM, Pretraining, SequenceClassifier, TokenClassifier,
                                 QuestionAnswering)}
LABELLED = (SequenceClassifier, TokenClassifier)
# HF architectures read -> the class whose weights the directory holds (ModernBERT's task heads are not ours)
_HF_CLASSES = {"BertModel": Encoder, "BertForMaskedLM": MaskedLM, "BertForPreTraining": Pretraining,
               "BertForSequenceClassification": SequenceClassifier,
               "BertForTokenClassification": TokenClassifier, "BertForQuestionAnswering": QuestionAnswering,
               "ModernBertModel": Encoder, "ModernBertForMaskedLM": MaskedLM}


def read_head_meta(path: str | Path) -> dict:
    """tformer.json's "head", "id2label" and "pooling" (absent: {}); an HF directory's id2label as a list
(HF's sequence classifiers pool [CLS])."""
    path = Path(path)
    if is_tformer_checkpoint(path):
        meta = read_json(path / CONFIG_FILE)
        return {k: meta[k] for k in ("head", "id2label", "pooling") if k in meta}
    hf = read_json(path / "config.json")
    out = {}
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch in _HF_CLASSES:
        out["head"] = _HF_CLASSES[arch].__name__
    if arch in ("BertForSequenceClassification", "BertForTokenClassification") and hf.get("id2label"):
        out["id2label"] = [hf["id2label"][k] for k in sorted(hf["id2label"], key=int)]
    return out


def load_saved(path: Path, device="cpu") -> tuple[nn.Module, dict]:
    """The checkpoint's own model (its head class), on CPU, and its head metadata."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a tformer encoder checkpoint or an HF BERT "
                                "directory (config.json, model.safetensors, tokenizer.json)")
    meta = read_head_meta(path)
    cls = HEADS[meta.get("head", "Encoder")]
    if not is_tformer_checkpoint(path):
        hf = read_json(path / "config.json")
        if hf.get("model_type") == "modernbert":
            arch = (hf.get("architectures") or ["ModernBertModel"])[0]
            if arch not in _HF_CLASSES:
                raise CheckpointError(f"{path} holds {arch}, whose task head tformer does not read: pass a "
                                      "ModernBertModel or ModernBertForMaskedLM directory (a new head starts fresh)")
            from tformer.convert.hf_modernbert import load_hf_modernbert

            return load_hf_modernbert(path, cls, device), meta
        if hf.get("model_type") != "bert":
            raise CheckpointError(f"{path} is not a BERT or ModernBERT model: encoder tasks read BERT-family "
                                  "checkpoints")
        from tformer.convert.hf_bert import load_hf_bert

        return load_hf_bert(path, cls, device), meta
    config = read_config(path)
    if config.architecture != "encoder":
        raise CheckpointError(f"{path} holds a {config.architecture}, not an encoder (BERT-family) model")
    with torch.device("meta"):
        model = _build(cls, config, len(meta.get("id2label") or []) or 2, meta.get("pooling", "cls"))
    from tformer.io import load_state_dict_strict

    load_state_dict_strict(model, read_safetensors_dir(path), str(path))
    model.tie_weights()
    reset_buffers(model, "cpu")
    return model.to(device).eval(), meta


def _split(model: nn.Module) -> tuple[dict, dict]:
    """(the encoder's tensors by its own names, the head tensors by the model's names)."""
    state = model.state_dict()
    if isinstance(model, Encoder):
        return state, {}
    trunk = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return trunk, {k: v for k, v in state.items() if not k.startswith("encoder.")}


@torch.no_grad()
def load_with_head(path: str | Path, cls: type[nn.Module], n_labels: int | None = None, device="cpu",
                   config_changes: dict | None = None, pooling: str | None = None) -> tuple[nn.Module, list[str]]:
    """A `cls` model from the encoder checkpoint `path` (see the module docstring), in train mode,
    and the names of the parameters that start fresh. `n_labels` for classifiers (default: the
    checkpoint's labels); `pooling` for a SequenceClassifier (default: the checkpoint's, else "cls");
    `config_changes` ModelConfig fields to change (e.g. n_layers of a student, dropout), which leave
    the weights of dropped layers out."""
    source, meta = load_saved(Path(path))
    return with_head(source, meta, cls, n_labels, device, config_changes, pooling, str(path))


@torch.no_grad()
def with_head(source: nn.Module, meta: dict, cls: type[nn.Module], n_labels: int | None = None, device="cpu",
              config_changes: dict | None = None, pooling: str | None = None,
              path: str = "the encoder") -> tuple[nn.Module, list[str]]:
    """`load_with_head` on a model already built (`source`, its head metadata `meta`)."""
    config = source.config.replace(**(config_changes or {}))
    n_labels = n_labels or len(meta.get("id2label") or []) or 2
    model = _build(cls, config, n_labels, pooling or meta.get("pooling", "cls"))
    trunk, heads = _split(source)
    target_trunk = _trunk(model)
    own = target_trunk.state_dict()
    kept = {k: v for k, v in trunk.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept and not k.startswith("pooler.")]
    if missing:
        raise CheckpointError(f"{path}'s encoder does not fit {cls.__name__}: missing or reshaped {missing[:6]}")
    target_trunk.load_state_dict(kept, strict=False)
    fresh = [f"encoder.{k}" if target_trunk is not model else k for k in own if k not in kept]
    std = config.init_std
    for name, module in model.named_children():
        if module is target_trunk:
            continue
        for pname, param in module.named_parameters(prefix=name):
            if pname in heads and heads[pname].shape == param.shape:
                param.copy_(heads[pname])
                continue
            fresh.append(pname)
            if param.dim() >= 2:
                nn.init.normal_(param, 0.0, std)
            elif pname.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                nn.init.zeros_(param)
    if "encoder.pooler.dense.weight" in fresh:
        nn.init.normal_(model.encoder.pooler.dense.weight, 0.0, std)
        nn.init.zeros_(model.encoder.pooler.dense.bias)
    model.tie_weights()
    return model.to(device).train(), fresh


def _build(cls: type[nn.Module], config, n_labels: int, pooling: str) -> nn.Module:
    if cls is SequenceClassifier:
        return cls(config, n_labels, pooling)
    return cls(config, n_labels) if cls in LABELLED else cls(config)


def _trunk(model: nn.Module) -> Encoder:
    return model if isinstance(model, Encoder) else model.encoder


def save_with_head(model: nn.Module, path: str | Path, tokenizer, id2label: list[str] | None = None,
                   extra: dict | None = None) -> Path:
    """A tformer checkpoint of `model` that names its head class (labels, pooling) for `load_with_head`;
    a model that is not an encoder (an EncoderDecoder) is saved as it is, with `extra`."""
    if type(model).__name__ not in HEADS:
        return save(model, path, tokenizer, extra=extra)
    meta = {"head": type(model).__name__, **({"id2label": list(id2label)} if id2label else {}),
            **({"pooling": model.pooling} if isinstance(model, SequenceClassifier) else {}), **(extra or {})}
    return save(model, path, tokenizer, extra=meta)


def load_classifier(path: str | Path, device="cpu") -> tuple[SequenceClassifier, list[str]]:
    """A fine-tuned sequence classifier and its labels (id -> name), in eval mode."""
    path = Path(path)
    model, meta = load_saved(path, device)
    if not isinstance(model, SequenceClassifier):
        raise CheckpointError(f"{path} has no classifier head (its model is {type(model).__name__}): fine-tune one "
                              "with `tformer finetune CKPT --task classify --data FILE`")
    labels = meta.get("id2label") or [str(i) for i in range(model.classifier.out_features)]
    return model.eval(), labels


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
