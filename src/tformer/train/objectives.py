"""What a run minimises: one object the training loop calls on each micro-batch.

An objective maps a batch (a dict of tensors: `tokens`, `targets`, ...; see data/sft.py) to a dict
of scalars whose "loss" is minimised and whose other entries are logged; `weight(batch)` is the
batch's share of the step's mean (its trained targets, or its pairs), so micro-batches of unequal
size average as one batch would.

    NextToken  cross-entropy of each next token (IGNORE targets untrained): pretraining and SFT
    Distill    NextToken mixed with the KL to a teacher's distributions (train/distill.py)
    DPO        the sigmoid preference loss of Rafailov et al. 2023 against a frozen reference
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tformer.data.sft import IGNORE
from tformer.train.linear_ce import linear_cross_entropy


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE; 0 (with a gradient) when all are."""
    flat = targets.flatten()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)
    return loss / (flat != IGNORE).sum().clamp(min=1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> (B,) summed log-probabilities of each row's trained targets."""
    trained = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return (picked * trained).sum(-1)


def _forward(model, batch: dict) -> torch.Tensor:
    segments = batch.get("segments")
    return model(batch["tokens"]) if segments is None else model(batch["tokens"], segments=segments)


class NextToken:
    """Pretraining and supervised fine-tuning: mean next-token cross-entropy. A plain output head
    goes through `linear_cross_entropy`, so the (B, T, V) fp32 logits and their gradient never exist;
    compiled, the model and the loss are one graph."""
    unit = "tokens"  # what `weight` counts

    def __init__(self, model, label_smoothing: float = 0.0, compile_: bool = False):
        self.model, self.label_smoothing = model, label_smoothing
        head = model.output
        self.chunked_head = type(head) is nn.Linear and head.bias is None  # not quantized, no adapter
        self._loss = torch.compile(self._forward_loss) if compile_ else self._forward_loss

    def _forward_loss(self, tokens, targets, segments=None):
        hidden = self.model.features(tokens) if segments is None else self.model.features(tokens, segments=segments)
        if self.chunked_head:
            return linear_cross_entropy(hidden, self.model.output.weight, targets, IGNORE, self.label_smoothing)
        return next_token_loss(self.model.output(hidden), targets, self.label_smoothing)

    def __call__(self, batch: dict) -> dict:
        return {"loss": self._loss(batch["tokens"], batch["targets"], batch.get("segments"))}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class Distill(NextToken):
    """Distillation from a teacher (train/distill.py's loss) on unpacked batches."""

    def __init__(self, model, teacher, vocab_size: int, alpha: float, temperature: float,
                 label_smoothing: float = 0.0, cosine: float = 0.0, compile_: bool = False):
        from tformer.train.distill import make_distill_loss_fn

        self.model = model
        self._fn = make_distill_loss_fn(model, teacher, vocab_size, alpha, temperature, label_smoothing, cosine,
                                        compile_)

    def __call__(self, batch: dict) -> dict:
        if "segments" in batch:
            raise ValueError("distillation reads unpacked batches: turn packing off")
        return {"loss": self._fn(batch["tokens"], batch["targets"])}


class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7):

        r(y) = beta * (log pi(y | x) - log pi_ref(y | x))
        loss = -log sigmoid(r(chosen) - r(rejected))

    The reference log-probabilities come from the batch (`reference`, precomputed once), else from
    `reference` (a frozen model), else from the model itself with its LoRA adapters switched off
    (the starting weights, at no extra memory). Logged: the mean rewards of chosen and rejected
    responses, their margin, and the share of pairs whose chosen reward is the higher."""
    unit = "pairs"

    def __init__(self, model, beta: float = 0.1, reference=None):
        if beta <= 0:
            raise ValueError(f"dpo_beta must be > 0, got {beta}")
        self.model, self.beta, self.reference = model, beta, reference

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) reference log-probabilities of the batch's rows (chosen rows, then rejected)."""
        from tformer.adapters import adapters_disabled

        if "reference" in batch:
            return batch["reference"].T.flatten().to(batch["tokens"].device)
        with torch.no_grad(), (nullcontext(self.reference) if self.reference is not None
                               else adapters_disabled(self.model)) as ref:
            return sequence_logps(_forward(ref, batch), batch["targets"])

    def __call__(self, batch: dict) -> dict:
        B = batch["n_pairs"]
        policy = sequence_logps(_forward(self.model, batch), batch["targets"])
        reference = self.reference_logps(batch)
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards[:B], rewards[B:]
        loss = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.beta)
        return {"loss": loss, "chosen_reward": chosen.detach().mean(), "rejected_reward": rejected.detach().mean(),
                "reward_margin": (chosen - rejected).detach().mean(),
                "reward_accuracy": (chosen > rejected).float().mean()}

    def weight(self, batch: dict) -> float:
        return batch["n_pairs"]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); inputs (B,) summed log-probs."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()
