"""The training loop, top to bottom: data, model, optimiser, steps, eval, checkpoints.

One optimiser step (`train_step`) = `grad_accum` micro-batches of (batch_size, seq_len) tokens. The step's
learning rate, batches and dropout draws depend only on the step and the saved RNG states,
so a resumed run continues exactly where the interrupted one was (on CPU, bit for bit).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.accounting import peak_flops, training_flops_per_token
from tformer.nn.moe import load_stats, moe_layers
from tformer.train.config import TrainConfig
from tformer.train.data import TrainData, prepare_data
from tformer.train.distill import load_teacher, make_distill_loss_fn
from tformer.train.evaluate import evaluate, lm_loss
from tformer.train.logger import MetricsLogger
from tformer.train.interrupt import StopOnInterrupt, TrainingInterrupted, resume_command
from tformer.train.model_setup import preset_checkpoint, setup_model
from tformer.train.optim import make_optimizer
from tformer.train.schedule import learning_rate
from tformer.train.state import ResumePoint, checkpoint_dirs, earlier_run, latest_intact, remove_run, save_best
from tformer.train.state import save_training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    step: int
    val_loss: float
    val_bpc: float
    out_dir: str


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


def _evaluate(model, data: TrainData, cfg: TrainConfig, device, autocast, full: bool = False) -> dict:
    """`evaluate` on the validation split: cfg.eval_batches batches (0: all), or with `full` the whole split."""
    if full:  # no grads: wider batches run faster
        return evaluate(model, data.shards.val, max(cfg.batch_size, 32), cfg.seq_len, device=device,
                        autocast=autocast)
    return evaluate(model, data.shards.val, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches or None,
                    device=device, autocast=autocast)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train as `cfg` says; see the module docstring. Ctrl-C saves a resumable checkpoint and
    raises `TrainingInterrupted` (a KeyboardInterrupt) naming it and the command that resumes."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    resumed = _prepare_out_dir(cfg)
    data = prepare_data(cfg, resumed.path if resumed else preset_checkpoint(cfg))
    teacher = load_teacher(cfg.teacher, device, data.tokenizer.vocab_size, cfg.seq_len) if cfg.teacher else None
    model = setup_model(cfg, data.tokenizer, device, resumed.model if resumed else None, teacher)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    start, best = _restore(resumed.state, optimizer, device) if resumed else (0, float("inf"))
    if teacher is not None:
        loss_fn = make_distill_loss_fn(model, teacher, data.tokenizer.vocab_size, cfg.distill_alpha,
                                       cfg.distill_temperature, cfg.label_smoothing, cfg.distill_cosine, cfg.compile)
    else:
        loss_fn = make_loss_fn(model, cfg.label_smoothing, cfg.compile)
    autocast = autocast_for(device, cfg.dtype)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    flops_step = training_flops_per_token(model.config, cfg.seq_len) * tokens_per_step
    peak = peak_flops(device)
    logger = MetricsLogger(cfg, start, progress)
    moe = moe_layers(model)
    for layer in moe:
        layer.aux_grad_scale = 1 / cfg.grad_accum  # router losses, like the main loss, average over micro-batches
    t0 = time.perf_counter()
    step, loss = start, torch.zeros(())
    with StopOnInterrupt() as interrupt:
        while step < cfg.max_steps:
            elapsed = time.perf_counter() - t0
            if interrupt.requested:
                raise _interrupted(cfg, model, data, optimizer, step, best, logger)
            if cfg.max_time and elapsed >= cfg.max_time:
                break
            lr = _lr(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()
            micro_batches = [data.train_batch(cfg.batch_size, cfg.seq_len, step * cfg.grad_accum + i, device)
                             for i in range(cfg.grad_accum)]
            loss = train_step(model, loss_fn, optimizer, micro_batches, cfg.grad_clip, autocast)
            for layer in moe:
                layer.update_expert_bias()  # DeepSeek-V3 aux-loss-free balancing (no-op without expert_bias)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _check_finite(loss, step, cfg)
                dt = time.perf_counter() - t_step
                mfu = flops_step / dt / peak if peak else None
                logger.log_train(step, loss, lr, tokens_per_step / dt, mfu, load_stats(moe) if moe else None)
            for layer in moe:
                layer.pop_load()  # expert loads count one step
            if step % cfg.eval_every == 0 and step < cfg.max_steps:
                _check_finite(loss, step, cfg)
                metrics = _evaluate(model, data, cfg, device, autocast)
                logger.log_eval(step, metrics, time.perf_counter() - t0)
                best = _save(cfg, model, data, optimizer, step, metrics, best)
        # the final evaluation covers the whole validation split
        _check_finite(loss, step, cfg)
        metrics = _evaluate(model, data, cfg, device, autocast, full=True)
        logger.log_eval(step, metrics, time.perf_counter() - t0)
        best = _save(cfg, model, data, optimizer, step, metrics, best)
    logger.close()
    return TrainResult(step, metrics["val_loss"], metrics["val_bpc"], cfg.out_dir)


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


def _restore(state: dict, optimizer, device) -> tuple[int, float]:
    """Load a checkpoint's optimiser and RNG states; its step and best validation loss."""
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["step"], state["best_val_loss"]


def _interrupted(cfg, model, data, optimizer, step: int, best: float, logger) -> TrainingInterrupted:
    """Save a resumable checkpoint of `step` (unless the loop just did) and say how to resume."""
    path = Path(cfg.out_dir) / "checkpoints" / f"step-{step:06d}"
    if path not in checkpoint_dirs(cfg.out_dir):
        path = save_training(cfg.out_dir, model, data.tokenizer, optimizer, step, _train_state(best), cfg.keep_last)
    logger.close()
    command = resume_command(cfg)
    print(f"interrupted: saved a resumable checkpoint of step {step} to {path}\nresume with: {command}",
          file=sys.stderr, flush=True)
    return TrainingInterrupted(step, path, command)


def _lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if cfg.max_time and step >= cfg.warmup:  # a time budget: after warmup, decay by the share of time used
        step = cfg.warmup + int((cfg.max_steps - cfg.warmup) * elapsed / cfg.max_time)
    return learning_rate(step, cfg.schedule, cfg.lr, cfg.warmup, cfg.max_steps, cfg.min_lr)


def make_loss_fn(model, label_smoothing: float = 0.0, compile_: bool = False):
    """(x, y) -> loss. Compiled, the loss is in the graph with the model, so the log-softmax
    fuses with the output projection's epilogue instead of materialising fp32 logits."""

    def forward_loss(x, y):
        return lm_loss(model(x), y, label_smoothing)

    return torch.compile(forward_loss) if compile_ else forward_loss


def train_step(model, loss_fn, optimizer, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               grad_clip: float = 0.0, autocast=None) -> torch.Tensor:
    """One optimiser step over `micro_batches` ((x, y) pairs); returns the mean loss, detached.

    Each micro-batch's mean loss is divided by their number before its backward, so the summed
    gradients are those of the mean loss over all of them: equal-sized micro-batches give the
    gradient of one batch that concatenates them. Gradients are clipped to norm `grad_clip`
    (0: not clipped), applied, and set to None.
    """
    losses = []
    for x, y in micro_batches:
        with autocast or nullcontext():
            loss = loss_fn(x, y) / len(micro_batches)
        loss.backward()
        losses.append(loss.detach())
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).sum()


def _check_finite(loss: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    if not torch.isfinite(loss):
        last = checkpoint_dirs(cfg.out_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"loss became {loss.item()} by step {step}; {where}. Lower --lr, raise --warmup, "
            "keep --grad-clip on, or resume from that checkpoint with --resume"
        )


def _save(cfg, model, data, optimizer, step, metrics, best) -> float:
    _check_finite(torch.tensor(metrics["val_loss"]), step, cfg)  # never checkpoint diverged weights
    if cfg.save_every == 0 or step % cfg.save_every == 0 or step == cfg.max_steps:
        state = _train_state(min(best, metrics["val_loss"]))
        save_training(cfg.out_dir, model, data.tokenizer, optimizer, step, state, cfg.keep_last)
    if metrics["val_loss"] < best:
        save_best(cfg.out_dir, model, data.tokenizer, step, metrics["val_loss"])
    return min(best, metrics["val_loss"])


def _train_state(best_val_loss: float) -> dict:
    """What a checkpoint needs besides weights and optimiser to continue exactly."""
    return {
        "torch_rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        "best_val_loss": best_val_loss,
    }
