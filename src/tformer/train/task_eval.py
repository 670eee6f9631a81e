"""`tformer eval task CKPT --task T --data FILE`: a fine-tuned encoder or encoder-decoder scored on a test
file without training, by the metrics its fine-tuning reports (train/encoder_tasks.py's `evaluate`):

    classify          loss, accuracy, macro-F1            (the checkpoint's labels)
    token-classify    loss, entity precision/recall/F1, word accuracy
    qa                loss, SQuAD exact match and F1
    mlm               masked-LM loss (the same masked positions every run)
    seq2seq           loss; greedy exact match, BLEU and chrF of every pair (or the first --eval-decode)

The checkpoint must hold the task's head (a classifier for classify, ...): a head that would start fresh
is refused, since its scores would be noise.
"""

from __future__ import annotations

from dataclasses import replace

HEAD = {"classify": ("SequenceClassifier",), "token-classify": ("TokenClassifier",),
        "qa": ("QuestionAnswering",), "mlm": ("MaskedLM", "Pretraining")}
TASKS = (*HEAD, "seq2seq")


def evaluate_checkpoint(cfg, device="cpu") -> dict:
    """The metrics of cfg.checkpoint on cfg.data (used whole as the evaluation split)."""
    from tformer.train.encoder_models import read_head_meta
    from tformer.train.encoder_tasks import build, evaluate
    from tformer.train.from_preset import is_preset

    if cfg.task not in TASKS:
        raise ValueError(f"tformer eval task scores {', '.join(TASKS)}, not {cfg.task!r}")
    if is_preset(cfg.checkpoint):
        raise ValueError(f"{cfg.checkpoint} is a preset: evaluate a trained checkpoint (tformer finetune's OUT/final)")
    if not cfg.data:
        raise ValueError("pass the test data: --data FILE")
    cfg = replace(cfg, val_data=list(cfg.data))
    if cfg.task in HEAD:
        meta = read_head_meta(cfg.checkpoint)
        if meta.get("head") not in HEAD[cfg.task]:
            raise ValueError(f"{cfg.checkpoint} holds {meta.get('head', 'an encoder without a task head')}, not the "
                             f"{' or '.join(HEAD[cfg.task])} --task {cfg.task} scores: fine-tune one with "
                             f"`tformer finetune CKPT --task {cfg.task}`")
        cfg = replace(cfg, labels=meta.get("id2label"))
    cfg.validate()
    model, objective, _, test, _, stats, _ = build(cfg, device)
    metrics = evaluate(model.eval(), objective, test, cfg.batch_size, device)
    examples = getattr(test, "examples", test)  # QA counts questions, not their windows
    return {"examples": len(examples), **metrics}
