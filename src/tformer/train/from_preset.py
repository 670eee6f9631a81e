"""Encoder and encoder-decoder runs that start from a preset (`tformer finetune bert-base-uncased --task
mlm`, `tformer finetune transformer-base --task seq2seq`) rather than a checkpoint: a byte-level BPE
vocabulary trained on the run's training text, with the special tokens the architecture reads and a
template that adds them, and a freshly initialised model of the preset's shape.

    encoder           [PAD] [UNK] [CLS] [SEP] [MASK]; template [CLS] A [SEP] (B [SEP]), as BERT's
    encoder_decoder   <pad> (the decoder's start) </s> <unk>, then n_sentinels <extra_id_i> whose ids
                      count down from <extra_id_0>, as T5's; template A </s>
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import processors

from tformer.tokenizer import Tokenizer

SPECIALS = {"encoder": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
            "encoder_decoder": ("<pad>", "</s>", "<unk>")}


def is_preset(spec: str) -> bool:
    """True when `spec` names a preset and no file or directory."""
    from tformer.presets import UnknownPresetError, find_preset

    if Path(spec).expanduser().exists():
        return False
    try:
        find_preset(spec)
    except UnknownPresetError:
        return False
    return True


def train_tokenizer(texts: list[str], vocab_size: int, architecture: str, n_sentinels: int = 0) -> Tokenizer:
    """Byte-level BPE of `vocab_size` ids (specials included) on `texts`, with `architecture`'s
    special tokens and template."""
    specials = SPECIALS[architecture]
    if architecture == "encoder_decoder":
        specials += tuple(f"<extra_id_{i}>" for i in reversed(range(n_sentinels)))  # <extra_id_0> last, as T5
    tokenizer = Tokenizer.train_bpe(texts, vocab_size, special_tokens=specials)
    ids = {t: tokenizer.token_to_id(t) for t in specials[:5]}
    if architecture == "encoder":
        template = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[(t, ids[t]) for t in ("[CLS]", "[SEP]")])
    else:
        template = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                 special_tokens=[("</s>", ids["</s>"])])
    tokenizer.hf.post_processor = template
    return tokenizer


def require(name: str, architecture: str, task: str) -> None:
    """ValueError unless preset `name` is of `architecture`, which `task` (e.g. "--task mlm") trains."""
    from tformer.presets import get_preset

    found = get_preset(name).architecture
    if found != architecture:
        kinds = {"encoder": "encoders (bert-base-uncased, modernbert-base, ...)",
                 "encoder_decoder": "encoder-decoders (transformer-base, t5-small, t5-v1_1-small)"}
        raise ValueError(f"{name} is a {found.replace('_', '-')} preset: {task} trains {kinds[architecture]}")


def fresh_config(name: str, tokenizer: Tokenizer, max_len: int, changes: dict):
    """The preset's ModelConfig with `changes` (ModelConfig fields), its vocabulary the tokenizer's
    (padded as `tformer train` pads it) and its positions at least max_len."""
    from tformer.config import ConfigError
    from tformer.presets import get_preset
    from tformer.train.model_setup import padded_vocab

    config = get_preset(name)
    try:
        return config.replace(**{"vocab_size": padded_vocab(tokenizer.vocab_size),
                                 "max_seq_len": max(config.max_seq_len, max_len), **changes})
    except (ConfigError, TypeError) as e:
        raise ValueError(f"--model options for {name}: {e}") from None


def mlm_build(cfg, device):
    """encoder_tasks.build for masked-LM pretraining of a new encoder of the preset cfg.checkpoint."""
    from tformer.models import build_model
    from tformer.models.encoder import MaskedLM, Pretraining
    from tformer.train.encoder_models import with_head
    from tformer.train.encoder_tasks import dropout_changes, mlm_data, text_documents
    from tformer.train.objectives import MaskedLMObjective

    if cfg.task != "mlm":
        raise ValueError(f"--task {cfg.task} starts from a trained encoder: {cfg.checkpoint} is a preset, which "
                         "trains from scratch with --task mlm")
    require(cfg.checkpoint, "encoder", "--task mlm")
    documents = text_documents(cfg)
    tokenizer = train_tokenizer(documents[0], cfg.vocab_size, "encoder")
    config = fresh_config(cfg.checkpoint, tokenizer, cfg.max_len, {**cfg.model, **dropout_changes(cfg)})
    model = with_head(build_model(config, device=device), {}, Pretraining if cfg.nsp else MaskedLM, device=device)[0]
    train, val, stats = mlm_data(cfg, tokenizer, documents)
    stats += f"; a new {cfg.checkpoint} model, BPE vocabulary {tokenizer.vocab_size}"
    return model, MaskedLMObjective(model), train, val, None, stats, tokenizer
