"""The training loop, top to bottom: data, model, objective, optimiser, steps, eval, checkpoints.

Pretraining, supervised fine-tuning, DPO and distillation are the same loop: the data gives batches
(dicts of tensors, train/data.py), the objective turns a batch into a loss (train/objectives.py),
and the model is the preset's, a checkpoint's, or that with LoRA adapters (train/model_setup.py).
One optimiser step (`train_step`) = `grad_accum` micro-batches of (batch_size, seq_len) tokens. The step's
learning rate, batches and dropout draws depend only on the step and the saved RNG states,
so a resumed run continues exactly where the interrupted one was (on CPU, bit for bit).
Under torchrun with --parallel ddp|fsdp (train/parallel.py) every rank runs this loop on its share of
each batch; rank 0 alone logs and prints, and checkpoints are sharded (train/sharded.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.accounting import peak_flops, training_flops_per_token
from tformer.inference.flex import use_attention_backend
from tformer.nn.moe import load_stats, moe_layers
from tformer.train.config import TrainConfig
from tformer.train.data import prepare_data
from tformer.train.distill import load_teacher
from tformer.train.evaluate import evaluate_objective
from tformer.train.logger import MetricsLogger
from tformer.train.interrupt import StopOnInterrupt, TrainingInterrupted, resume_command
from tformer.train.model_setup import preset_checkpoint, setup_model
from tformer.train.objectives import DPO, Distill, NextToken, precompute_reference
from tformer.train.optim import make_optimizer
from tformer.train.parallel import Parallel, clip_grad_norm, gradient_sync, init_parallel, parallelize
from tformer.train.parallel import uses_fsdp_precision
from tformer.train.schedule import learning_rate
from tformer.train.state import ResumePoint, checkpoint_dirs, earlier_run, latest_intact, remove_run, save_best
from tformer.train.state import save_training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    step: int
    val_loss: float
    val_bpc: float | None  # None for fine-tuning examples, which are not a text corpus
    out_dir: str
    main: bool = True  # rank 0 (or the only process): the one that prints


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _evaluate(model, objective, data, cfg: TrainConfig, device, autocast, full: bool = False,
              parallel: Parallel | None = None) -> dict:
    """The objective on the validation split: cfg.eval_batches batches (0: all), or with `full` all of it.
    Each rank evaluates the whole split in batches of the global batch size (cfg.batch_size x ranks), as
    one process would; the losses are averaged so every rank takes the same decisions."""
    batch_size = cfg.batch_size * (parallel.world if parallel is not None else 1)
    if full:  # no grads: wider batches run faster
        batches = data.val_batches(max(batch_size, 32 if data.kind == "text" else batch_size), cfg.seq_len, device)
    else:
        batches = data.val_batches(batch_size, cfg.seq_len, device, cfg.eval_batches or None)
    metrics = evaluate_objective(model, objective, batches, autocast)
    if parallel is not None and parallel.distributed:
        metrics["val_loss"] = float(parallel.all_sum([metrics["val_loss"]])[0]) / parallel.world
    metrics["val_bpc"] = data.bits_per_char(metrics["val_loss"])
    return metrics


def make_objective(cfg: TrainConfig, model, data, teacher=None):
    """The loss of the run: DPO for preference data, distillation with a teacher, else next-token."""
    if data.kind == "preference":
        if cfg.teacher:
            raise ValueError("preference data trains with DPO, which takes no --teacher")
        reference = None
        if cfg.method == "full" and cfg.dpo_reference == "model":  # LoRA: the base without adapters
            from copy import deepcopy

            reference = deepcopy(model).eval().requires_grad_(False)
        return DPO(model, cfg.dpo_beta, reference)
    if teacher is not None:
        return Distill(model, teacher, data.tokenizer.vocab_size, cfg.distill_alpha, cfg.distill_temperature,
                       cfg.label_smoothing, cfg.distill_cosine, cfg.compile)
    return NextToken(model, cfg.label_smoothing, cfg.compile, cfg.compile_scope)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train as `cfg` says; see the module docstring. Ctrl-C saves a resumable checkpoint and
    raises `TrainingInterrupted` (a KeyboardInterrupt) naming it and the command that resumes."""
    cfg.validate()
    parallel, device = init_parallel(cfg)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull) if not parallel.main else nullcontext():
            return _train(cfg, parallel, device, progress)
    finally:
        parallel.close()


def _train(cfg: TrainConfig, parallel: Parallel, device: torch.device, progress: bool) -> TrainResult:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same on every rank: every rank builds the same model
    with parallel.main_first():
        resumed = _prepare_out_dir(cfg)
    with parallel.main_first():  # tokenizer and shard caches written once
        data = prepare_data(cfg, resumed.path if resumed else preset_checkpoint(cfg))
    if data.kind != "text":
        print(data.stats)
    if parallel.distributed and data.kind == "preference":
        raise ValueError(f"DPO (preference data) runs on one process: drop --parallel {cfg.parallel}")
    teacher = load_teacher(cfg.teacher, device, data.tokenizer.vocab_size, cfg.seq_len) if cfg.teacher else None
    model = setup_model(cfg, data.tokenizer, device, resumed, teacher)
    use_attention_backend(model, device, compile=not cfg.compile, training=True)  # FlexAttention or SDPA
    trained = parallelize(model, cfg, parallel, device)
    if parallel.distributed:  # each rank its own dropout draws
        torch.manual_seed(cfg.seed + parallel.rank)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                               state_dtype=getattr(torch, cfg.optimizer_states))
    start, best = _restore(resumed, model, optimizer, device, parallel) if resumed else (0, float("inf"))
    objective = make_objective(cfg, trained, data, teacher)
    autocast = nullcontext() if uses_fsdp_precision(cfg, device) else autocast_for(device, cfg.dtype)
    if isinstance(objective, DPO) and cfg.dpo_reference == "precomputed":
        precompute_reference(objective, data, cfg.batch_size, device, autocast)
    saving = _Saving(cfg, data, parallel)
    flops_per_token = training_flops_per_token(model.config, cfg.seq_len)
    peak = peak_flops(device)
    peak = peak * parallel.world * parallel.tp if peak else None  # the ranks' devices together
    logger = MetricsLogger(cfg, start, progress) if parallel.main else _Quiet()
    shard = {"rank": parallel.rank, "world": parallel.world} if parallel.distributed else {}
    moe = moe_layers(model)
    for layer in moe:
        layer.aux_grad_scale = 1 / cfg.grad_accum  # router losses, like the main loss, average over micro-batches
    t0 = t_log = time.perf_counter()
    step, loss, tokens = start, torch.zeros(()), 0
    with StopOnInterrupt() as interrupt:
        while step < cfg.max_steps:
            elapsed = time.perf_counter() - t0
            if parallel.distributed:  # every rank stops (and sets the LR) at the same step
                requested, elapsed = parallel.all_max([float(interrupt.requested), elapsed])
                interrupt.requested = bool(requested)
            if interrupt.requested:
                raise _interrupted(cfg, model, saving, optimizer, step, best, logger)
            if cfg.max_time and elapsed >= cfg.max_time:
                break
            lr = _lr(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [data.train_batch(cfg.batch_size, cfg.seq_len, step * cfg.grad_accum + i, device,
                                              **shard) for i in range(cfg.grad_accum)]
            stats = train_step(model, objective, optimizer, micro_batches, cfg.grad_clip, autocast, parallel, trained)
            loss = stats["loss"]
            # fine-tuning rows vary in width; the ranks' batches are alike in size
            tokens += sum(batch["tokens"].numel() for batch in micro_batches) * parallel.world
            for layer in moe:
                layer.update_expert_bias()  # DeepSeek-V3 aux-loss-free balancing (no-op without expert_bias)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _check_finite(loss, step, cfg)  # the step's one host sync: the queued steps finish here
                dt = time.perf_counter() - t_log  # the steps since the last log, evaluations excluded
                mfu = flops_per_token * tokens / dt / peak if peak else None
                extra = {k: float(v) for k, v in stats.items() if k != "loss"}
                extra.update(load_stats(moe) if moe else {})
                if device.type == "cuda":
                    extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log_train(step, loss, lr, tokens / dt, mfu, extra)
                t_log, tokens = time.perf_counter(), 0
            for layer in moe:
                layer.pop_load()  # expert loads count one step
            if step % cfg.eval_every == 0 and step < cfg.max_steps:
                _check_finite(loss, step, cfg)
                metrics = _evaluate(model, objective, data, cfg, device, autocast, parallel=parallel)
                logger.log_eval(step, metrics, time.perf_counter() - t0)
                best = saving.save(model, optimizer, step, metrics, best)
                t_log, tokens = time.perf_counter(), 0
        # the final evaluation covers the whole validation split
        _check_finite(loss, step, cfg)
        metrics = _evaluate(model, objective, data, cfg, device, autocast, full=True, parallel=parallel)
        logger.log_eval(step, metrics, time.perf_counter() - t0)
        best = saving.save(model, optimizer, step, metrics, best)
    logger.close()
    return TrainResult(step, metrics["val_loss"], metrics["val_bpc"], cfg.out_dir, parallel.main)


class _Quiet:
    """The logger of ranks other than 0: they write nothing."""

    def log_train(self, *args, **kwargs) -> None:
        pass

    log_eval = log_train

    def close(self) -> None:
        pass


def _prepare_out_dir(cfg: TrainConfig) -> ResumePoint | None:
    """The checkpoint to resume from (cfg.resume), else a clear out_dir: an earlier run there is
    refused, or with cfg.overwrite deleted."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite deletes it: pass only one")
    if cfg.resume:
        point, skipped = latest_intact(cfg.out_dir)
        for path, why in skipped:
            print(f"skipping checkpoint {path}: {why} (moved to {path.name}.corrupt)")
        if point is None:
            print(f"no checkpoint in {cfg.out_dir}/checkpoints: starting from scratch")
        else:
            print(f"resuming from {point.path} (step {point.state['step']})")
        return point
    found = earlier_run(cfg.out_dir)
    if found and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to replace it, or another --out-dir")
    outputs = [(Path(cfg.out_dir) / name).resolve() for name in found]
    for source in (cfg.preset, cfg.teacher):
        if source and any(Path(source).resolve().is_relative_to(out) for out in outputs):
            raise ValueError(f"{source} is part of the earlier run in {cfg.out_dir}, which --overwrite deletes: "
                             "pass another --out-dir")
    if found:
        remove_run(cfg.out_dir)
        print(f"--overwrite: deleted the earlier run's {', '.join(found)} in {cfg.out_dir}")
    return None


def _restore(resumed: ResumePoint, model, optimizer, device, parallel: Parallel) -> tuple[int, float]:
    """Load a checkpoint's optimiser and RNG states (and a sharded one's weights); its step and best
    validation loss."""
    state = resumed.state
    if resumed.sharded:
        from tformer.train.sharded import load_sharded

        load_sharded(resumed.path, state, model, optimizer, parallel.rank, parallel.world)
        return state["step"], state["best_val_loss"]
    if parallel.mode == "fsdp" or parallel.tp > 1:  # the whole optimiser state, sharded as the parameters are
        from tformer.train.sharded import load_full_optimizer

        load_full_optimizer(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["step"], state["best_val_loss"]


def _interrupted(cfg, model, saving, optimizer, step: int, best: float, logger) -> TrainingInterrupted:
    """Save a resumable checkpoint of `step` (unless the loop just did) and say how to resume."""
    path = Path(cfg.out_dir) / "checkpoints" / f"step-{step:06d}"
    if path not in checkpoint_dirs(cfg.out_dir):
        path = saving.checkpoint(model, optimizer, step, best)
    logger.close()
    command = resume_command(cfg)
    if saving.parallel.distributed and command.startswith("tformer "):  # launched by torchrun: relaunched by it
        command = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', 'N')} -m {command}"
    if saving.parallel.main:
        print(f"interrupted: saved a resumable checkpoint of step {step} to {path}\nresume with: {command}",
              file=sys.stderr, flush=True)
    return TrainingInterrupted(step, path, command)


def _lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if cfg.max_time and step >= cfg.warmup:  # a time budget: after warmup, decay by the share of time used
        step = cfg.warmup + int((cfg.max_steps - cfg.warmup) * elapsed / cfg.max_time)
    return learning_rate(step, cfg.schedule, cfg.lr, cfg.warmup, cfg.max_steps, cfg.min_lr)


def train_step(model, objective, optimizer, micro_batches: Sequence[dict], grad_clip: float = 0.0,
               autocast=None, parallel: Parallel | None = None, trained=None) -> dict[str, torch.Tensor]:
    """One optimiser step over `micro_batches` (batch dicts); returns the objective's outputs
    averaged over them, detached ("loss" and what it logs).

    Each micro-batch's loss is weighted by its share of the step (`objective.weight`: its trained
    targets or pairs) before its backward, so the summed gradients are those of the mean over every
    target of the step, as one batch holding all of them would give. Gradients are clipped to norm
    `grad_clip` (0: not clipped), applied, and set to None; with clipping, "grad_norm" is their total
    norm before it.

    Under DDP/FSDP2 (`parallel`, `trained`: what parallelize returned) the weights' total is summed over
    the ranks, and each rank's loss scaled by the number of ranks, so the averaged gradients are those of
    the mean over every target of the global step; gradients are reduced on the last micro-batch only,
    and the outputs are summed over the ranks (the global means).
    """
    world = parallel.world if parallel is not None and parallel.distributed else 1
    weights = [objective.weight(batch) for batch in micro_batches]
    total = sum(weights) if world == 1 else float(parallel.all_sum([float(sum(weights))])[0])
    total = total or 1
    stats: dict[str, torch.Tensor] = {}
    for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
        with gradient_sync(trained, i == len(micro_batches) - 1) if world > 1 else nullcontext():
            with autocast or nullcontext():
                out = objective(batch)
            (out["loss"] * (weight * world / total)).backward()
        for key, value in out.items():
            stats[key] = stats.get(key, 0) + value.detach().float() * (weight / total)
    if world > 1:
        summed = parallel.all_sum(torch.stack([stats[k] for k in stats]).cpu())
        stats = {k: summed[j].float().to(v.device) for j, (k, v) in enumerate(stats.items())}
    if grad_clip > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        sharded = parallel is not None and parallel.distributed  # DTensor gradients (FSDP2, tensor parallel)
        norm = clip_grad_norm(params, grad_clip) if sharded else torch.nn.utils.clip_grad_norm_(params, grad_clip)
        stats["grad_norm"] = norm.detach().float()  # before clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def _check_finite(loss: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    if not torch.isfinite(loss):
        last = checkpoint_dirs(cfg.out_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"loss became {loss.item()} by step {step}; {where}. Lower --lr, raise --warmup, "
            "keep --grad-clip on, or resume from that checkpoint with --resume"
        )


class _Saving:
    """The run's checkpoints: with its tokenizer, its chat template (the data's, else the starting
    checkpoint's) and, for adapters, the base they were trained on."""

    def __init__(self, cfg: TrainConfig, data, parallel: Parallel | None = None):
        from tformer.convert.gguf import read_chat_template

        self.cfg, self.tokenizer, self.parallel = cfg, data.tokenizer, parallel or Parallel()
        start = preset_checkpoint(cfg)
        template = getattr(data, "template", None)
        self.template = template.source if template is not None else (read_chat_template(start) if start else None)
        self.base = str(start) if start else None

    def checkpoint(self, model, optimizer, step: int, best: float) -> Path:
        if self.parallel.distributed:
            from tformer.train.sharded import save_sharded

            return save_sharded(self.cfg.out_dir, model, optimizer, step, best, self.cfg.keep_last, self.tokenizer,
                                self.template)
        return save_training(self.cfg.out_dir, model, self.tokenizer, optimizer, step, _train_state(best),
                             self.cfg.keep_last, self.template, self.base)

    def save(self, model, optimizer, step: int, metrics: dict, best: float) -> float:
        """Checkpoint at an evaluation (as cfg.save_every says) and a new best; returns the best val loss."""
        cfg = self.cfg
        _check_finite(torch.tensor(metrics["val_loss"]), step, cfg)  # never checkpoint diverged weights
        if cfg.save_every == 0 or step % cfg.save_every == 0 or step == cfg.max_steps:
            self.checkpoint(model, optimizer, step, min(best, metrics["val_loss"]))
        if metrics["val_loss"] < best:
            self._best(model, step, metrics["val_loss"])
        return min(best, metrics["val_loss"])


    def _best(self, model, step: int, val_loss: float) -> None:
        """The new best model as one ordinary checkpoint (gathered whole from the ranks onto rank 0)."""
        if self.parallel.distributed:
            from tformer.train.sharded import full_model

            model = full_model(model)
        if self.parallel.main:
            save_best(self.cfg.out_dir, model, self.tokenizer, step, val_loss, self.template, self.base)


def _train_state(best_val_loss: float) -> dict:
    """What a checkpoint needs besides weights and optimiser to continue exactly."""
    return {
        "torch_rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        "best_val_loss": best_val_loss,
    }
