"""Encoder-decoder tasks of `tformer finetune CKPT --task ...`, run by train/encoder_tasks.py's loop:

    seq2seq           source -> target pairs (.jsonl {"source", "target"} or .csv with those columns;
                      --source-column / --target-column rename them): teacher-forced cross-entropy
                      (the Seq2Seq objective, with --label-smoothing); evaluation adds the outputs of
                      greedy decoding on (up to --eval-decode of) the validation pairs: exact match, and
                      sacrebleu's corpus BLEU and chrF where sacrebleu is installed
    span-corruption   T5's denoising pretraining (Raffel et al. 2020) on text files (default: the bundled
                      plays): each --max-len-token segment loses 15% of its tokens in spans of mean
                      length 3 (--noise-density, --mean-span), each replaced by a sentinel; the target
                      lists the dropped spans behind their sentinels

CKPT is a tformer encoder-decoder checkpoint, an HF T5 or Marian directory, or a preset
(transformer-base, t5-small, t5-v1_1-small) that trains from scratch: a byte-level BPE vocabulary of
--vocab-size is trained on the training texts (train/from_preset.py) and the preset's shape takes
--model.FIELD changes. Sources and targets are read through the tokenizer's template and end in its
end token (inference/seq2seq.encode_texts); the decoder starts from the pad token, as T5's and
Marian's do, so `tformer generate OUT/final --prompt SOURCE` decodes the result.
"""

from __future__ import annotations

from functools import partial

import torch

from tformer.data.seq2seq_splits import PairSplit, SpanSplit, segments
from tformer.inference.seq2seq import encode_texts, seq2seq_generate, start_id

TASKS = ("seq2seq", "span-corruption")
SENTINEL = "<extra_id_{}>"
N_SENTINELS = 100  # a new vocabulary's, as T5's


def _cut(row: list[int], max_len: int) -> list[int]:
    return row if len(row) <= max_len else row[: max_len - 1] + row[-1:]  # the end token kept


def pair_texts(cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from tformer.data.classify import read_labelled
    from tformer.train.encoder_tasks import train_val

    return train_val(cfg, lambda path: read_labelled(path, cfg.source_column, cfg.target_column))


def sentinels(tokenizer) -> tuple[int, int]:
    """(the id of <extra_id_0>, how many <extra_id_i> follow it downwards: T5's layout)."""
    first = tokenizer.token_to_id(SENTINEL.format(0))
    if first is None:
        raise ValueError("the tokenizer has no sentinel tokens (<extra_id_0>, ...), which span corruption writes "
                         "into sources and targets: use a T5 checkpoint, or a preset (its vocabulary gets them)")
    n = 1
    while tokenizer.token_to_id(SENTINEL.format(n)) == first - n:
        n += 1
    return first, n


def splits(cfg, tokenizer, texts) -> tuple[object, object, str]:
    """(train split, val split, a line describing them) from `texts` (pair_texts or text_documents)."""
    start, pad = start_id(tokenizer), tokenizer.pad_id
    if cfg.task == "seq2seq":
        out = []
        for i, part in enumerate(texts):
            sources = encode_texts(tokenizer, [s for s, _ in part])
            targets = encode_texts(tokenizer, [t for _, t in part])
            pairs = [(_cut(s, cfg.max_len), _cut(t, cfg.max_len)) for s, t in zip(sources, targets)]
            out.append(PairSplit(pairs, start, pad, cfg.seed + i, texts=part))
        return out[0], out[1], f"{len(out[0])} training pairs, {len(out[1])} validation pairs"
    first, n = sentinels(tokenizer)
    out = []
    for i, docs in enumerate(texts):
        ids = [t for row in tokenizer.encode_batch(docs) for t in row]
        out.append(SpanSplit(segments(ids, cfg.max_len - 1), first, n, tokenizer.eos_id, start, pad, cfg.seed + i,
                             cfg.noise_density, cfg.mean_span))
    return out[0], out[1], (f"{len(out[0])} training segments, {len(out[1])} validation segments of "
                            f"{cfg.max_len - 1} tokens; {n} sentinels")


def load_model(cfg, device):
    """(model, tokenizer, texts, a note) for cfg.checkpoint: a checkpoint, or a preset from scratch."""
    from tformer.checkpoint import load, model_from_tensors
    from tformer.inference.text import load_tokenizer
    from tformer.models import build_model
    from tformer.train import from_preset
    from tformer.train.encoder_tasks import dropout_changes, text_documents

    preset = from_preset.is_preset(cfg.checkpoint)
    if preset:
        from_preset.require(cfg.checkpoint, "encoder_decoder", f"--task {cfg.task}")
    texts = pair_texts(cfg) if cfg.task == "seq2seq" else text_documents(cfg)
    changes = dropout_changes(cfg)
    if preset:
        train = [t for pair in texts[0] for t in pair] if cfg.task == "seq2seq" else texts[0]
        tokenizer = from_preset.train_tokenizer(train, cfg.vocab_size, "encoder_decoder",
                                                n_sentinels=N_SENTINELS if cfg.task == "span-corruption" else 0)
        config = from_preset.fresh_config(cfg.checkpoint, tokenizer, cfg.max_len, {**cfg.model, **changes})
        model = build_model(config, device=device).train()
        return model, tokenizer, texts, f"a new {cfg.checkpoint} model, BPE vocabulary {tokenizer.vocab_size}"
    from tformer.sources import resolve_config

    if resolve_config(cfg.checkpoint)[0].architecture != "encoder_decoder":
        raise ValueError(f"{cfg.checkpoint} is not an encoder-decoder: --task {cfg.task} trains T5, Marian or "
                         "transformer-base models")
    model = load(cfg.checkpoint, device=device)
    if changes:  # the same weights in a model built with the new dropout
        model = model_from_tensors(model.config.replace(**changes), dict(model.state_dict()), cfg.checkpoint, device)
    return model.train(), load_tokenizer(cfg.checkpoint), texts, f"from {cfg.checkpoint}"


def build(cfg, device):
    """(model, objective, train split, val split, None, stats line, tokenizer), as encoder_tasks.build."""
    from tformer.train.objectives import Seq2Seq

    model, tokenizer, texts, note = load_model(cfg, device)
    positions = model.config.max_seq_len if model.config.positions in ("learned", "sinusoidal") else None
    if positions is not None and cfg.max_len > positions:
        raise ValueError(f"--max-len {cfg.max_len} is longer than the model's {positions} positions")
    train, val, stats = splits(cfg, tokenizer, texts)
    if isinstance(val, PairSplit) and cfg.eval_decode:
        val.score = partial(decode_metrics, split=val, tokenizer=tokenizer, n=cfg.eval_decode, max_len=cfg.max_len)
    return model, Seq2Seq(model, cfg.label_smoothing), train, val, None, f"{stats}; {note}", tokenizer


@torch.no_grad()
def decode_metrics(model, batch_size: int, device, split: PairSplit, tokenizer, n: int,
                   max_len: int) -> dict[str, float]:
    """Greedy outputs (at most max_len tokens) of the first n validation sources against their targets:
    exact match, and corpus BLEU and chrF (sacrebleu's defaults) where sacrebleu is installed."""
    was = model.training
    model.eval()
    sources = [s for s, _ in split.pairs[:n]]
    outputs = []
    for i in range(0, len(sources), batch_size):
        rows = seq2seq_generate(model, sources[i: i + batch_size], max_len, start_id(tokenizer), [tokenizer.eos_id])
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    model.train(was)
    refs = [t.strip() for _, t in split.texts[:n]]
    metrics = {"val_exact_match": sum(o == r for o, r in zip(outputs, refs)) / len(refs)}
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ModuleNotFoundError:
        return metrics
    metrics["val_bleu"] = BLEU().corpus_score(outputs, [refs]).score
    metrics["val_chrf"] = CHRF().corpus_score(outputs, [refs]).score
    return metrics
