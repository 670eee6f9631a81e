"""Fine-tuning an encoder (BERT, MiniLM) for understanding tasks, one step at a time through the
training loop's `train_step`:

    classify          SequenceClassifier (pooling "cls": BERT's pooled [CLS]; "mean": the mean of the
                      real tokens, for sentence-transformers models) on (text, label) CSV/JSONL
                      (data/classify.py); Classification
    token-classify    TokenClassifier on words with one tag each (named entities: data/tagging.py,
                      train/tagging_task.py); TokenClassification; entity F1 as seqeval
    qa                QuestionAnswering on SQuAD-style questions (data/qa.py, train/qa_task.py);
                      SpanExtraction; SQuAD's exact match and F1
    mlm               masked-LM (continued) pretraining on a text corpus (data/mlm.py); with `nsp`,
                      the Pretraining model and next-sentence pairs; MaskedLMObjective
    distill-encoder   a MaskedLM student with every other layer of the checkpoint (usually the teacher
                      itself: DistilBERT's initialisation, train/distill.py's init_from_teacher), trained
                      on masked-LM batches against a MaskedLM teacher; EncoderDistill
    seq2seq, span-corruption   encoder-decoders (T5, Marian, transformer-base): train/seq2seq_tasks.py

The checkpoint may also be a preset (bert-base-uncased, modernbert-base; for the encoder-decoder tasks
transformer-base, t5-small): the model starts from scratch with a BPE vocabulary trained on the data
(train/from_preset.py), its shape changed by `model` (ModelConfig fields).

The recipe is BERT's fine-tuning one (Devlin et al. 2019, A.3): AdamW, lr 2e-5..5e-5 with 10% linear
warmup and linear decay to 0, 3 epochs, batch 32, 128 tokens, weight decay 0.01; lr 0 takes the task's
default (DEFAULT_LR: 3e-5 for encoders, 1e-4 for encoder-decoders, 1e-3 from a preset). The validation
split is evaluated at the end (and every `eval_every` steps): loss, and for classification accuracy
and macro-F1. The final model is saved to out_dir/final with its tokenizer (and id2label), and the
metrics to out_dir/metrics.json. Every `save_every` steps and on Ctrl-C the run's state goes to
out_dir/last.pt (train/task_state.py), from which `resume` continues. `method` "lora" or "qlora"
trains adapters (and a classifier's head) on a frozen base (train/task_lora.py), merged at the end.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tformer.data.classify import LabelledSplit, classification_metrics, encode_texts, label_counts, label_ids
from tformer.data.classify import read_labelled
from tformer.models.encoder import POOLINGS
from tformer.train.encoder_models import load_with_head, save_with_head, write_json
from tformer.train.evaluate import evaluate_objective
from tformer.train.optim import make_optimizer
from tformer.train.interrupt import StopOnInterrupt, TrainingInterrupted, resume_command
from tformer.train.schedule import learning_rate
from tformer.train.task_state import STATE_FILE, restore_state, save_state

from tformer.train import seq2seq_tasks, task_lora
from tformer.train import from_preset
from tformer.train.from_preset import is_preset

TASKS = ("classify", "token-classify", "qa", "mlm", "distill-encoder", *seq2seq_tasks.TASKS)
TEXT_TASKS = ("mlm", "span-corruption")  # no --data: the bundled plays
DEFAULT_LR = {"encoder": 3e-5, "encoder_decoder": 1e-4, "preset": 1e-3}


@dataclass
class EncoderTaskConfig:
    task: str
    checkpoint: str  # the encoder to start from (distill-encoder: the student takes every other layer of it)
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.1  # held out of `data` when no val_data is given
    out_dir: str = "runs/finetune"
    lr: float = 0.0  # 0: DEFAULT_LR for the task and starting point
    epochs: float = 3.0
    max_steps: int = 0  # > 0: this many steps instead of `epochs`
    warmup_ratio: float = 0.1
    warmup: int = -1  # >= 0: warmup steps instead of warmup_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 32
    max_len: int = 128
    dropout: float | None = None  # None: the checkpoint's
    seed: int = 0
    eval_every: int = 0  # 0: at the end only
    save_every: int = 500  # steps between saves of the resumable state OUT/last.pt (0: on Ctrl-C only)
    resume: bool = False  # continue from OUT/last.pt
    log_every: int = 10
    text_column: str = ""  # "": the task's (classify: text; token-classify: tokens)
    label_column: str = ""  # "": the task's (classify: label; token-classify: tags)
    pooling: str = "cls"  # classify: "cls" (BERT's pooler) or "mean" (sentence-transformers models)
    mlm_prob: float = 0.15
    nsp: bool = False
    teacher: str = ""
    student_layers: int = 0  # 0: half the teacher's
    alpha_ce: float = 5.0  # DistilBERT's published weights and temperature
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    doc_stride: int = 0  # qa: tokens two windows of one context share (0: max_len // 3, HF's 128 of 384)
    max_answer_tokens: int = 30  # qa
    source_column: str = "source"  # seq2seq
    target_column: str = "target"
    label_smoothing: float = 0.0
    eval_decode: int = 200  # seq2seq: validation pairs decoded greedily at each evaluation (0: none)
    noise_density: float = 0.15  # span-corruption (T5's)
    mean_span: float = 3.0
    vocab_size: int = 8192  # from a preset: the BPE vocabulary trained on the data
    model: dict = field(default_factory=dict)  # from a preset: ModelConfig fields changed
    labels: list[str] | None = None  # the label names to use (evaluating a checkpoint: its own); None: the data's
    method: str = "full"  # full, lora or qlora (train/task_lora.py)
    lora: dict = field(default_factory=dict)  # LoRAConfig fields (r, alpha, dropout, targets, rslora)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr < 0:
            raise ValueError(f"lr must be > 0 (or 0: the task's default), got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.doc_stride < self.max_len // 2 and self.doc_stride:
            raise ValueError(f"doc_stride must be in [0, max_len // 2 = {self.max_len // 2}), got {self.doc_stride}")
        if self.eval_decode < 0:
            raise ValueError(f"eval_decode must be >= 0, got {self.eval_decode}")
        if self.method not in task_lora.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(task_lora.METHODS)}")
        if self.lora and self.method == "full":
            raise ValueError("--lora.FIELD options set the adapters of --method lora or qlora")
        if self.model and not is_preset(self.checkpoint):
            raise ValueError(f"--model.FIELD changes the shape of a new model: {self.checkpoint} is a checkpoint, "
                             "not a preset")
        if self.max_len < 4:
            raise ValueError(f"max_len must be >= 4 (room for [CLS], [SEP] and text), got {self.max_len}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.data and self.task not in TEXT_TASKS:
            raise ValueError("pass the training data: --data FILE")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.pooling != "cls" and self.task != "classify":
            raise ValueError(f"--pooling applies to --task classify only, not {self.task}")
        if self.task == "distill-encoder" and not self.teacher:
            raise ValueError("--task distill-encoder needs --teacher CKPT (a masked-LM encoder)")


def _tokenizer(path: str):
    from tformer.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path)
    except FileNotFoundError:
        raise ValueError(f"{path} has no tokenizer.json: an encoder task needs the checkpoint's tokenizer") from None


def _split_off(items: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    if len(items) - n_val < 1:
        raise ValueError(f"{len(items)} examples are too few to hold out a validation split: pass --val-data")
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def train_val(cfg: EncoderTaskConfig, read) -> tuple[list, list]:
    """(training examples, validation examples): `read(path)` of every cfg.data file, and of every
    cfg.val_data file or else cfg.val_fraction of the training ones held out by cfg.seed."""
    rows = [r for path in cfg.data for r in read(path)]
    if cfg.val_data:
        return rows, [r for path in cfg.val_data for r in read(path)]
    return _split_off(rows, cfg.val_fraction, cfg.seed)


def columns(cfg: EncoderTaskConfig) -> tuple[str, str]:
    """The (text, label) columns or keys the labelled data is read by."""
    text, label = ("tokens", "tags") if cfg.task == "token-classify" else ("text", "label")
    return cfg.text_column or text, cfg.label_column or label


def classify_data(cfg: EncoderTaskConfig, tokenizer):
    """(train split, val split, id2label, a line describing them)."""
    text_column, label_column = columns(cfg)
    rows, val = train_val(cfg, lambda path: read_labelled(path, text_column, label_column))
    id2label = cfg.labels or label_ids([label for _, label in rows])
    unknown = sorted({label for _, label in val} - set(id2label))
    if unknown:
        raise ValueError(f"the validation data has labels the training data lacks: {unknown[:5]}")
    index = {name: i for i, name in enumerate(id2label)}
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def split(pairs, seed):
        return LabelledSplit(encode_texts([t for t, _ in pairs], tokenizer, cfg.max_len),
                             [index[label] for _, label in pairs], pad, seed)

    stats = (f"{len(rows)} training examples ({label_counts([lb for _, lb in rows])}), "
             f"{len(val)} validation examples")
    return split(rows, cfg.seed), split(val, cfg.seed), id2label, stats


def text_documents(cfg: EncoderTaskConfig) -> tuple[list[str], list[str]]:
    """(training documents, validation documents) of the text tasks: cfg.data (default: the bundled
    plays) and cfg.val_data, or documents held out of cfg.data (of one document, its last lines)."""
    from tformer.data.corpus import load_corpus

    docs = load_corpus(cfg.data or None)
    if cfg.val_data:
        return docs, load_corpus(cfg.val_data)
    if len(docs) > 1:
        return _split_off(docs, cfg.val_fraction, cfg.seed)
    lines = docs[0].splitlines()
    cut = int(len(lines) * (1 - cfg.val_fraction))
    return ["\n".join(lines[:cut])], ["\n".join(lines[cut:])]


def mlm_data(cfg: EncoderTaskConfig, tokenizer, documents=None):
    """(train split, val split, a line describing them) of masked-LM rows from text files."""
    from tformer.data.mlm import MLMCollator, MLMExamples, SpecialTokens, mlm_rows

    collator = MLMCollator(SpecialTokens.from_tokenizer(tokenizer), cfg.mlm_prob)
    splits = []
    for i, part in enumerate(documents or text_documents(cfg)):
        rows, nsp = mlm_rows(part, tokenizer, cfg.max_len, cfg.nsp, cfg.seed + i)
        splits.append(MLMExamples(rows, collator, cfg.seed + i, nsp))
    what = "sentence pairs" if cfg.nsp else "segments"
    return splits[0], splits[1], f"{len(splits[0])} training {what}, {len(splits[1])} validation {what}"


def build(cfg: EncoderTaskConfig, device):
    """(model, objective, train split, val split, id2label or None, stats line, tokenizer); max_len is
    capped at the model's positions."""
    from tformer.models.encoder import MaskedLM, Pretraining, QuestionAnswering, SequenceClassifier, TokenClassifier
    from tformer.sources import resolve_config
    from tformer.train.objectives import (Classification, EncoderDistill, MaskedLMObjective, SpanExtraction,
                                          TokenClassification)
    from tformer.train.qa_task import qa_data
    from tformer.train.tagging_task import tagged_data

    if cfg.task in seq2seq_tasks.TASKS:
        return seq2seq_tasks.build(cfg, device)
    if is_preset(cfg.checkpoint):
        return from_preset.mlm_build(cfg, device)
    tokenizer = _tokenizer(cfg.teacher if cfg.task == "distill-encoder" else cfg.checkpoint)
    positions = resolve_config(cfg.checkpoint)[0].max_seq_len
    if cfg.max_len > positions:  # BERT's 128 default is longer than a small model's context
        cfg = replace(cfg, max_len=positions)
    changes = dropout_changes(cfg)
    teacher, id2label = None, None
    if cfg.task == "classify":
        train, val, id2label, stats = classify_data(cfg, tokenizer)
        model, fresh = load_with_head(cfg.checkpoint, SequenceClassifier, len(id2label), device, changes,
                                      cfg.pooling)
        objective = Classification(model)
    elif cfg.task == "token-classify":
        train, val, id2label, stats = tagged_data(cfg, tokenizer)
        model, fresh = load_with_head(cfg.checkpoint, TokenClassifier, len(id2label), device, changes)
        objective = TokenClassification(model)
    elif cfg.task == "qa":
        train, val, stats = qa_data(replace(cfg, doc_stride=cfg.doc_stride or cfg.max_len // 3), tokenizer)
        model, fresh = load_with_head(cfg.checkpoint, QuestionAnswering, None, device, changes)
        objective = SpanExtraction(model)
    elif cfg.task == "mlm":
        train, val, stats = mlm_data(cfg, tokenizer)
        model, fresh = load_with_head(cfg.checkpoint, Pretraining if cfg.nsp else MaskedLM, None, device, changes)
        objective = MaskedLMObjective(model)
    else:
        from tformer.train.distill import init_from_teacher

        if _fresh_head(cfg.teacher):
            raise ValueError(f"the teacher {cfg.teacher} has no masked-LM head (its soft targets): distill from a "
                             "masked-LM checkpoint (BertForMaskedLM, or `tformer finetune --task mlm`'s output)")
        train, val, stats = mlm_data(cfg, tokenizer)
        teacher = load_with_head(cfg.teacher, MaskedLM, None, device)[0].eval().requires_grad_(False)
        source, fresh = load_with_head(cfg.checkpoint, MaskedLM, None, device, changes)
        if source.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"{cfg.checkpoint} and the teacher {cfg.teacher} have different vocabularies "
                             f"({source.config.vocab_size} vs {teacher.config.vocab_size}): they must share one")
        n_layers = cfg.student_layers or max(source.config.n_layers // 2, 1)
        model, _ = load_with_head(cfg.checkpoint, MaskedLM, None, device, {**changes, "n_layers": n_layers})
        taken = init_from_teacher(model, source)
        stats += f"; student layers from {cfg.checkpoint}'s {taken}"
        objective = EncoderDistill(model, teacher, cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos, cfg.temperature)
    if fresh:
        stats += f"; new parameters: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}"
    return model, objective, train, val, id2label, stats, tokenizer


def dropout_changes(cfg: EncoderTaskConfig) -> dict:
    """The ModelConfig changes of cfg.dropout (none when it is None: the checkpoint's)."""
    p = cfg.dropout
    return {} if p is None else dict(emb_dropout=p, attn_dropout=p, resid_dropout=p)


def _fresh_head(path: str) -> bool:
    from tformer.train.encoder_models import read_head_meta

    return read_head_meta(path).get("head") not in ("MaskedLM", "Pretraining")


@torch.no_grad()
def evaluate(model, objective, split, batch_size: int, device) -> dict[str, float]:
    """The objective on a split (val_loss, ...), for classification val_accuracy and val_macro_f1 over
    the whole split, and the metrics of the split's `score(model, batch_size, device)` where a task
    gave it one."""
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in split.eval_batches(batch_size)]
    metrics = evaluate_objective(model, objective, batches)
    metrics.pop("val_ppl", None)
    if isinstance(split, LabelledSplit):
        was = model.training
        model.eval()
        predictions = torch.cat([objective.model(b["tokens"], b["attention_mask"]).argmax(-1) for b in batches])
        model.train(was)
        labels = torch.tensor(split.labels)
        scores = classification_metrics(predictions, labels)
        metrics.update(val_accuracy=scores["accuracy"], val_macro_f1=scores["macro_f1"])
    if getattr(split, "score", None):  # a task's own metrics (decoding, entities, answers), bound to the split
        metrics.update(split.score(model, batch_size, device))
    return metrics


def run(cfg: EncoderTaskConfig, device="cpu", progress=print) -> dict:
    """Train as `cfg` says (module docstring); returns the final metrics (also in out_dir/metrics.json)."""
    from tformer.train.loop import train_step

    cfg.validate()
    torch.manual_seed(cfg.seed)
    model, objective, train, val, id2label, stats, tokenizer = build(cfg, device)
    if not cfg.lr:
        start = "preset" if is_preset(cfg.checkpoint) else model.config.architecture
        cfg = replace(cfg, lr=DEFAULT_LR[start])
    progress(f"{stats}; lr {cfg.lr:g}; {task_lora.adapt(model, cfg.method, cfg.lora)}")
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup if cfg.warmup >= 0 else round(cfg.warmup_ratio * max_steps)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), eps=1e-6)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history, first, t0 = [], 0, time.perf_counter()
    if cfg.resume:
        first, history = restore_state(out, model, optimizer, tokenizer)
        progress(f"resumed from {out / STATE_FILE} at step {first}")
    else:
        (out / STATE_FILE).unlink(missing_ok=True)  # an earlier run's, overwritten
    with StopOnInterrupt() as stop:
        for step in range(first, max_steps):
            lr = learning_rate(step, "linear", cfg.lr, warmup, max_steps, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in train.batch(step, cfg.batch_size).items()}
            stats_ = train_step(model, objective, optimizer, [batch], cfg.grad_clip)
            if not torch.isfinite(stats_["loss"]):
                raise RuntimeError(f"the loss became {stats_['loss'].item()} at step {step + 1}: lower --lr")
            done = step + 1
            if done % cfg.log_every == 0 or done == max_steps:
                progress(f"step {done}/{max_steps} (epoch {done / steps_per_epoch:.2f}): loss "
                         f"{stats_['loss'].item():.4f}, lr {lr:.2e}, {time.perf_counter() - t0:.0f}s")
            if cfg.eval_every and done % cfg.eval_every == 0 and done < max_steps:
                history.append({"step": done, **evaluate(model, objective, val, cfg.batch_size, device)})
                progress(_format(history[-1]))
            if done < max_steps and (stop.requested or cfg.save_every and done % cfg.save_every == 0):
                path = save_state(out, model, optimizer, tokenizer, done, history)
                if stop.requested:
                    command = resume_command(cfg)
                    progress(f"interrupted: saved the run's state at step {done} to {path}\nresume with: {command}")
                    raise TrainingInterrupted(done, path, command)
    metrics = {"step": max_steps, **evaluate(model, objective, val, cfg.batch_size, device),
               "train_seconds": round(time.perf_counter() - t0, 1)}
    progress(_format(metrics))
    model = task_lora.merged(model, cfg.method).eval()
    save_with_head(model, out / "final", tokenizer, id2label, extra={"task": cfg.task})
    write_json(out / "metrics.json", {"final": metrics, "evaluations": history, "config": asdict(cfg),
                                      **({"id2label": id2label} if id2label else {})})
    (out / STATE_FILE).unlink(missing_ok=True)  # finished: final/ is the result
    return metrics


def _format(metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("val_") and not k.endswith(("_tokens", "_examples"))}
    return f"eval at step {metrics['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
