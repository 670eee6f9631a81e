"""Learning-rate schedules: lr(step) as a pure function of the step (so resume is exact).

    cosine:       linear warmup to lr, then cosine decay to min_lr at max_steps
    linear:       linear warmup, then linear decay to min_lr at max_steps
    constant:     linear warmup, then lr
    inverse_sqrt: Vaswani et al. 2017, 5.3: lr * min(step^-0.5, step * warmup^-1.5) * sqrt(warmup)
                  (normalised so the peak, reached at `warmup` steps, equals lr)
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")


def learning_rate(step: int, schedule: str, lr: float, warmup: int, max_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate for optimiser step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    s = step + 1  # the first step already gets a non-zero rate
    if schedule == "inverse_sqrt":
        w = max(warmup, 1)
        return lr * math.sqrt(w) * min(s**-0.5, s * w**-1.5)
    if s <= warmup:
        return lr * s / warmup
    if schedule == "constant":
        return lr
    progress = min((s - warmup) / max(max_steps - warmup, 1), 1.0)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
