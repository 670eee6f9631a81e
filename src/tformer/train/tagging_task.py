"""`tformer finetune CKPT --task token-classify`: a TokenClassifier (the encoder and a linear layer on
every token) on words with one tag each (data/tagging.py: .jsonl {"tokens", "tags"} or CoNLL files),
trained by train/encoder_tasks.py's loop with the TokenClassification objective. Evaluations add
seqeval's entity precision, recall and F1 and the word accuracy, from the prediction at each word's
first sub-token; the tags are saved with the checkpoint as id2label.
"""

from __future__ import annotations

from functools import partial

import torch

from tformer.data.tagging import TaggedSplit, encode_tagged, entity_scores, read_tagged


def tagged_data(cfg, tokenizer):
    """(train split, val split, id2label, a line describing them)."""
    from tformer.data.classify import label_ids
    from tformer.train.encoder_tasks import columns, train_val

    words_key, tags_key = columns(cfg)
    rows, val = train_val(cfg, lambda path: read_tagged(path, words_key, tags_key))
    id2label = cfg.labels or label_ids([t for _, tags in rows for t in tags], "the training tags")
    unknown = sorted({t for _, tags in val for t in tags} - set(id2label))
    if unknown:
        raise ValueError(f"the validation data has tags the training data lacks: {unknown[:5]}")
    index = {name: i for i, name in enumerate(id2label)}
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def split(sentences, seed):
        encoded = encode_tagged(tokenizer, sentences, index, cfg.max_len)
        out = TaggedSplit(*encoded, [tags for _, tags in sentences], pad, seed)
        out.score = partial(tagging_metrics, split=out, id2label=id2label)
        return out

    n_words = sum(len(w) for w, _ in rows)
    stats = f"{len(rows)} training sentences ({n_words} words, {len(id2label)} tags), {len(val)} validation sentences"
    return split(rows, cfg.seed), split(val, cfg.seed), id2label, stats


@torch.no_grad()
def tagging_metrics(model, batch_size: int, device, split: TaggedSplit, id2label: list[str]) -> dict[str, float]:
    """val_entity_precision / _recall / _f1 and val_word_accuracy over the split's kept words."""
    was = model.training
    model.eval()
    gold, predicted = [], []
    for start, batch in zip(range(0, len(split), batch_size), split.eval_batches(batch_size)):
        best = model(batch["tokens"].to(device), batch["attention_mask"].to(device)).argmax(-1).cpu()
        for b, i in enumerate(range(start, start + len(best))):
            firsts = split.firsts[i]
            predicted.append([id2label[t] for t in best[b, firsts].tolist()])
            gold.append(split.tags[i][: len(firsts)])
    model.train(was)
    s = entity_scores(gold, predicted)
    return {"val_entity_precision": s["precision"], "val_entity_recall": s["recall"], "val_entity_f1": s["f1"],
            "val_word_accuracy": s["accuracy"]}
