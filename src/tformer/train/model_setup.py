"""The model a run trains: from a preset, a ModelConfig JSON file, or an existing checkpoint; with
--method lora|qlora, LoRA adapters on its frozen (for qlora NF4-quantized) weights."""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.adapters import LoRAConfig, apply_lora, load_adapter, lora_layers, lora_parameters
from tformer.checkpoint import is_tformer_checkpoint, load
from tformer.config import ConfigError, ModelConfig
from tformer.models import build_model
from tformer.sources import resolve_config
from tformer.train.distill import init_from_teacher

TRAIN_ELSEWHERE = {
    "encoder": "Encoders train with `tformer finetune PRESET_OR_CKPT --task mlm` (masked-LM pretraining; a preset "
               "such as bert-base-uncased starts from scratch), then --task classify|distill-encoder.",
    "encoder_decoder": "Encoder-decoders train with `tformer finetune PRESET_OR_CKPT --task seq2seq --data "
                       "PAIRS.jsonl` (source/target pairs) or --task span-corruption (T5's denoising on text); "
                       "a preset such as transformer-base or t5-small starts from scratch.",
}
PAD_VOCAB_TO = 64  # matmul-friendly output size (nanoGPT's 50257 -> 50304 trick)


def padded_vocab(n: int) -> int:
    """A vocabulary of n ids rounded up to a multiple of PAD_VOCAB_TO."""
    return -(-n // PAD_VOCAB_TO) * PAD_VOCAB_TO


def model_config(cfg, tokenizer) -> ModelConfig:
    """The preset (with distill_init: the teacher's config) with the run's overrides; vocab sized
    to the tokenizer, context to seq_len."""
    source = cfg.teacher if cfg.distill_init else cfg.preset
    config, _ = resolve_config(source)
    changes = dict(cfg.model)
    if cfg.dropout:
        changes.update(emb_dropout=cfg.dropout, attn_dropout=cfg.dropout, resid_dropout=cfg.dropout)
    if not Path(source).is_dir():  # a fresh model: fit vocab and context to this run
        vocab = tokenizer.vocab_size
        changes.setdefault("vocab_size", padded_vocab(vocab))
        changes.setdefault("max_seq_len", max(config.max_seq_len, cfg.seq_len))
    config = config.replace(**changes)
    if config.architecture != "decoder":
        raise ConfigError(f"tformer train trains decoders (next-token prediction); this model is an "
                          f"{config.architecture.replace('_', '-')}. {TRAIN_ELSEWHERE[config.architecture]}")
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    if cfg.seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    return config


def preset_checkpoint(cfg) -> Path | None:
    """The checkpoint whose weights the run continues when its preset names one."""
    return Path(cfg.preset) if is_tformer_checkpoint(cfg.preset) else None


def setup_model(cfg, tokenizer, device: torch.device, resumed=None, teacher=None):
    """The model to train: a resumed checkpoint's (`resumed`: a ResumePoint), the preset checkpoint's
    weights, or a fresh one; with cfg.distill_init, a fresh one starts from `teacher`'s weights.
    With cfg.method lora or qlora, adapters are added (or the resumed checkpoint's loaded back)."""
    if resumed is not None and resumed.model is not None:
        return resumed.model.to(device).train()
    model = _base_model(cfg, tokenizer, device, teacher)
    if cfg.method == "full":
        return model
    if resumed is not None:
        return load_adapter(_lora_base(model, cfg, device), resumed.path).train()
    config = LoRAConfig.from_dict({**cfg.lora, "quantize": "nf4" if cfg.method == "qlora" else None})
    apply_lora(_lora_base(model, cfg, device), config)
    n = sum(p.numel() for p in lora_parameters(model))
    print(f"LoRA: {len(lora_layers(model))} layers adapted (rank {config.r}), {n:,} trainable parameters"
          + (", base in NF4" if config.quantize else ""))
    return model.train()


def _lora_base(model, cfg, device: torch.device):
    """A frozen base; in bf16 on a GPU training in bf16, as PEFT users load it (the adapters stay fp32)."""
    if cfg.method != "full" and device.type == "cuda" and cfg.dtype in ("auto", "bfloat16"):
        model = model.to(torch.bfloat16)
    return model.requires_grad_(False)


def _base_model(cfg, tokenizer, device: torch.device, teacher=None):
    config = model_config(cfg, tokenizer)
    if (path := preset_checkpoint(cfg)) is not None:  # continue training a checkpoint's weights
        model = load(path, device=device)
        if model.config != config:
            model = _with_config(model, config, device)
        return model.train()
    model = build_model(config, device=device)
    if cfg.distill_init:
        taken = init_from_teacher(model, teacher)
        print(f"student initialised from the teacher's embeddings, head and layers {taken}")
    return model.train()


def _with_config(model, config: ModelConfig, device):
    """Same weights, changed non-shape fields (e.g. dropout)."""
    new = build_model(config, device=device, init=False)
    new.load_state_dict(model.state_dict())
    return new
