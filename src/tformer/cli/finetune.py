"""`tformer finetune CKPT --data FILE.jsonl`: `tformer train` from a checkpoint, with fine-tuning defaults;
`--task classify|mlm|distill-encoder|seq2seq|span-corruption` trains an encoder or an encoder-decoder
instead (train/encoder_tasks.py, train/seq2seq_tasks.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tformer.cli import UserError
from tformer.train.config import TrainConfig

# LoRA's usual recipe (PEFT/TRL examples): lr 2e-4 decaying to a tenth, short warmup, no weight decay
DEFAULTS = TrainConfig(
    method="lora", lr=2e-4, min_lr=2e-5, warmup=10, max_steps=200, weight_decay=0.0, batch_size=8, seq_len=512,
    eval_every=50, out_dir="runs/finetune", sample_tokens=0,
)
FULL_LR = 2e-5  # --method full without --lr: all weights move, so a tenth of LoRA's rate


def register(sub: argparse._SubParsersAction) -> None:
    from tformer.cli.train import add_train_options

    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on chat, completion or preference JSONL (SFT or DPO; LoRA, QLoRA or full); "
             "train encoders and encoder-decoders (--task)",
        usage="%(prog)s CKPT --data FILE.jsonl [--method lora|qlora|full] [--OPTION VALUE ...]\n"
              "       %(prog)s CKPT --task classify|token-classify|qa|mlm|distill-encoder --data FILE "
              "[--OPTION VALUE ...]\n"
              "       %(prog)s CKPT_OR_PRESET --task seq2seq|span-corruption --data FILE [--OPTION VALUE ...]",
        description=(
            "Fine-tune CKPT (a tformer checkpoint, e.g. one converted from GGUF or HF) on JSONL examples: "
            '{"messages": [{"role", "content"}, ...]} (chat: the loss on assistant turns, rendered with the '
            'checkpoint\'s chat template), {"prompt", "completion"} (the loss on the completion), or '
            '{"prompt", "chosen", "rejected"} (DPO against the starting weights). The same as `tformer train '
            "--preset CKPT` with fine-tuning defaults: LoRA (--method lora; qlora puts the base in NF4, full trains "
            f"every weight at lr {FULL_LR:g} unless --lr is given), lr 2e-4, {DEFAULTS.max_steps} steps, --seq-len up "
            "to 512 (the model's context if shorter), packing, no sample at the end. Checkpoints go to --out-dir "
            "(adapters alone with LoRA); `tformer data inspect FILE --ckpt CKPT` shows what carries the loss."
        ),
        add_help=False,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to fine-tune")
    add_train_options(p, DEFAULTS, hidden=("preset",))
    add_encoder_options(p)
    p.set_defaults(func=run)


def make_finetune_config(args: argparse.Namespace) -> TrainConfig:
    """DEFAULTS with CKPT as the preset, then --config and the flags; --seq-len, when not given, is
    capped at the checkpoint's context and --lr follows --method."""
    from tformer.checkpoint import is_tformer_checkpoint
    from tformer.cli.train import make_config
    from tformer.sources import resolve_config

    given = vars(args)
    checkpoint = given.pop("checkpoint")
    if not Path(checkpoint).is_dir() or not is_tformer_checkpoint(checkpoint):
        raise UserError(f"{checkpoint} is not a tformer checkpoint: convert a GGUF file or HF directory first with "
                        "`tformer convert SRC OUT --to tformer`")
    given["preset"] = checkpoint
    cfg = make_config(args)
    changes = {}
    if "seq_len" not in given:
        changes["seq_len"] = min(cfg.seq_len, resolve_config(checkpoint)[0].max_seq_len)
    if "lr" not in given and cfg.method == "full":
        changes.update(lr=FULL_LR, min_lr=FULL_LR / 10)
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from tformer.cli.train import run_training

    encoder = {k: vars(args).pop(k) for k in list(vars(args)) if k in ENCODER_OPTIONS}
    if encoder.get("task", "sft") != "sft":
        return run_encoder_task(args, encoder)
    if encoder:
        raise UserError(f"--{next(iter(encoder)).replace('_', '-')} applies to the encoder tasks: pass "
                        "--task classify, mlm or distill-encoder")
    cfg = make_finetune_config(args)
    if not cfg.data:
        raise UserError("pass the examples to fine-tune on: --data FILE.jsonl")
    code = run_training(cfg)
    if code == 0:
        best = Path(cfg.out_dir) / "best"
        target = f"{cfg.preset} --adapter {best}" if cfg.method != "full" else str(best)
        print(f"chat with the result: tformer chat {target}")
    return code


# --- encoder tasks (train/encoder_tasks.py) ----------------------------------------------------------------

ENCODER_OPTIONS = ("task", "epochs", "warmup_ratio", "max_len", "text_column", "label_column", "pooling", "mlm_prob",
                   "nsp", "alpha_ce", "alpha_mlm", "alpha_cos", "student_layers", "source_column", "target_column",
                   "eval_decode", "noise_density", "mean_span", "doc_stride", "max_answer_tokens")
# TrainConfig options that mean the same for an encoder task (name there, if renamed)
SHARED_OPTIONS = {"lr": "lr", "batch_size": "batch_size", "seq_len": "max_len", "max_steps": "max_steps",
                  "warmup": "warmup", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "seed": "seed",
                  "out_dir": "out_dir", "data": "data", "val_data": "val_data", "val_fraction": "val_fraction",
                  "teacher": "teacher", "distill_temperature": "temperature", "eval_every": "eval_every",
                  "log_every": "log_every", "dropout": "dropout", "label_smoothing": "label_smoothing",
                  "vocab_size": "vocab_size", "save_every": "save_every", "resume": "resume", "method": "method",
                  "threads": None,
                  "device": None, "overwrite": None}


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    from tformer.train.encoder_tasks import TASKS, EncoderTaskConfig

    d = EncoderTaskConfig(task="classify", checkpoint="")
    g = p.add_argument_group(
        "encoder tasks", "--task classify|token-classify|qa|mlm|distill-encoder fine-tunes an encoder (BERT, "
        "MiniLM; CKPT a tformer encoder checkpoint or an HF BERT directory; with --task mlm also a preset such as bert-base-uncased, "
        "trained from scratch with a BPE vocabulary of --vocab-size learnt from the data and --model.FIELD "
        "VALUE shape changes) with BERT's recipe: lr 3e-5 (--lr), 3 epochs, 10% warmup, "
        "linear decay, batch 32 (--batch-size), 128 tokens, weight decay 0.01. classify: --data a .csv (header "
        "text,label) or .jsonl ({\"text\", \"label\"}); accuracy and macro-F1 on --val-data (or --val-fraction "
        "held out); the labels are saved with the checkpoint (OUT/final; `tformer classify` reads it). "
        "token-classify: --data .jsonl ({\"tokens\": [words], \"tags\": [BIO tags]}) or CoNLL files (word ... "
        "tag a line); entity precision, recall and F1 (seqeval's) and word accuracy. qa: extractive question "
        "answering on SQuAD .json or .jsonl ({\"question\", \"context\", \"answers\": {\"text\", "
        "\"answer_start\"}}), contexts in overlapping --max-len windows; SQuAD's exact match and F1; "
        "`tformer answer OUT/final` reads answers off the result. mlm: "
        "masked-LM on text files (one sentence a line). distill-encoder: a student with every other layer of "
        "CKPT (usually the teacher itself) trained against --teacher (a masked-LM checkpoint) on masked-LM text. "
        "--task seq2seq|span-corruption trains an encoder-decoder (CKPT a tformer encoder-decoder, an HF T5 or "
        "Marian directory, or a preset: transformer-base, t5-small, t5-v1_1-small, from scratch as above) the same "
        "way at lr 1e-4 (1e-3 from a preset). seq2seq: --data .jsonl ({\"source\", \"target\"}) or .csv "
        "pairs; evaluations add greedy decoding of --eval-decode validation pairs: exact match, BLEU and chrF "
        "(with sacrebleu installed). span-corruption: T5's denoising on text files (default: the bundled plays). "
        "`tformer generate OUT/final --prompt SOURCE` decodes the result. "
        "Also read: --data --val-data --val-fraction --out-dir --lr --batch-size --max-steps --warmup (steps) "
        "--weight-decay --grad-clip --seed --dropout --label-smoothing --vocab-size --model.FIELD --eval-every "
        "--log-every --save-every (the resumable state OUT/last.pt; default 500) --resume --distill-temperature "
        "--threads --device --overwrite; --method lora|qlora (default here: full) with --lora.FIELD trains "
        "adapters on a frozen base, and a classifier's head in full, merged into OUT/final at the end")
    S = argparse.SUPPRESS
    g.add_argument("--task", choices=("sft", *TASKS), default=S,
                   help="sft (default): chat/completion/preference JSONL through `tformer train`; or an encoder task")
    g.add_argument("--epochs", type=float, default=S, help=f"passes over the training data (default: {d.epochs:g})")
    g.add_argument("--warmup-ratio", type=float, default=S,
                   help=f"share of steps warming up (default: {d.warmup_ratio})")
    g.add_argument("--max-len", type=int, default=S, help=f"tokens per example at most (default: {d.max_len})")
    g.add_argument("--text-column", default=S,
                   help="classify: the text column or key (default: text); token-classify: the words' key (tokens)")
    g.add_argument("--label-column", default=S,
                   help="classify: the label column or key (default: label); token-classify: the tags' key (tags)")
    g.add_argument("--pooling", metavar="cls|mean", default=S,
                   help="classify: what the classifier reads: cls, BERT's pooled [CLS] (default; HF-exportable), or "
                        "mean, the mean of the real tokens (for sentence-transformers models such as all-MiniLM-L6-v2, "
                        "trained for mean pooling); saved with the checkpoint")
    g.add_argument("--mlm-prob", type=float, default=S, help=f"share of tokens masked (default: {d.mlm_prob})")
    g.add_argument("--nsp", action="store_true", default=S, help="mlm: sentence pairs and the next-sentence loss")
    for name, what in (("alpha_ce", "soft-target KL"), ("alpha_mlm", "masked-LM"), ("alpha_cos", "hidden cosine")):
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=S,
                       help=f"distill-encoder: weight of the {what} term (default: {getattr(d, name):g})")
    g.add_argument("--student-layers", type=int, default=S,
                   help="distill-encoder: the student's layers (default: half the teacher's)")
    g.add_argument("--doc-stride", type=int, default=S,
                   help="qa: tokens two windows of a long context share (default: a third of --max-len)")
    g.add_argument("--max-answer-tokens", type=int, default=S,
                   help=f"qa: the longest answer span (default: {d.max_answer_tokens})")
    g.add_argument("--source-column", default=S, help="seq2seq: the source column or key (default: source)")
    g.add_argument("--target-column", default=S, help="seq2seq: the target column or key (default: target)")
    g.add_argument("--eval-decode", type=int, default=S, metavar="N",
                   help=f"seq2seq: validation pairs decoded greedily at each evaluation (default: {d.eval_decode}; "
                        "0: none)")
    g.add_argument("--noise-density", type=float, default=S,
                   help=f"span-corruption: share of tokens dropped (default: {d.noise_density})")
    g.add_argument("--mean-span", type=float, default=S,
                   help=f"span-corruption: mean length of a dropped span (default: {d.mean_span:g})")


def run_encoder_task(args: argparse.Namespace, encoder: dict) -> int:
    """`--task classify|mlm|distill-encoder`: the options given, checked, then train/encoder_tasks.run."""
    import torch

    from tformer.cli.train import given_options
    from tformer.train.encoder_tasks import EncoderTaskConfig, run
    from tformer.train.from_preset import is_preset
    from tformer.train.interrupt import TrainingInterrupted
    from tformer.train.task_state import STATE_FILE

    given = {k: v for k, v in vars(args).items()
             if k not in ("func", "command", "defaults", "checkpoint") and not (k == "config" and v is None)
             and not k.startswith(("model.", "lora."))}
    nested = given_options(args)
    model, lora = nested.get("model", {}), nested.get("lora", {})
    other = [k for k in given if k not in SHARED_OPTIONS]
    if other:
        raise UserError(f"--{other[0].replace('_', '-').replace('.', '-')} applies to --task sft only "
                        f"(--task {encoder['task']} takes the options listed under `encoder tasks` in --help)")
    fields = {SHARED_OPTIONS[k]: v for k, v in given.items() if SHARED_OPTIONS[k]}
    fields.update({k: v for k, v in encoder.items() if k != "task"})
    fields.setdefault("out_dir", DEFAULTS.out_dir)
    cfg = EncoderTaskConfig(task=encoder["task"], checkpoint=args.checkpoint, model=model, lora=lora, **fields)
    if not Path(args.checkpoint).is_dir() and not is_preset(args.checkpoint):
        raise UserError(f"{args.checkpoint} is neither a directory nor a preset: pass a tformer checkpoint, an HF "
                        "model directory (config.json, model.safetensors, tokenizer.json) or a preset name "
                        "(`tformer params --list`)")
    final = Path(cfg.out_dir) / "final"
    if final.exists() and not given.get("overwrite"):
        raise UserError(f"{final} exists: pass --overwrite to replace it, or another --out-dir")
    state = Path(cfg.out_dir) / STATE_FILE
    if state.exists() and not cfg.resume and not given.get("overwrite"):
        raise UserError(f"{state} holds an unfinished run: pass --resume to continue it, --overwrite to start "
                        "afresh, or another --out-dir")
    if given.get("threads"):
        torch.set_num_threads(given["threads"])
    device = given.get("device", "cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        metrics = run(cfg, device)
    except TrainingInterrupted:  # Ctrl-C: the run saved its state and printed the command that resumes
        return 130
    print(f"done: {cfg.out_dir}/final; metrics in {cfg.out_dir}/metrics.json")
    if cfg.task == "classify":
        print(f"classify with it: tformer classify {final} --text \"...\"  "
              f"(accuracy {metrics['val_accuracy']:.4f}, macro-F1 {metrics['val_macro_f1']:.4f})")
    elif cfg.task == "qa":
        print(f"answer with it: tformer answer {final} --question \"...\" --context \"...\"  "
              f"(exact match {metrics['val_exact_match']:.1f}, F1 {metrics['val_f1']:.1f})")
    elif cfg.task == "token-classify":
        print(f"tag with it: tformer classify {final} --text \"...\"  (entity F1 {metrics['val_entity_f1']:.4f})")
    elif cfg.task == "seq2seq":
        print(f"decode with it: tformer generate {final} --temperature 0 --prompt \"...\"  (--beams 4 for beam search)")
    return 0
