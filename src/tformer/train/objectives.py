"""What a run minimises: one object the training loop calls on each micro-batch.

An objective maps a batch (a dict of tensors: `tokens`, `targets`, ...; see data/sft.py) to a dict
of scalars whose "loss" is minimised and whose other entries are logged; `weight(batch)` is the
batch's share of the step's mean (its trained targets, or its pairs), so micro-batches of unequal
size average as one batch would.

    NextToken  cross-entropy of each next token (IGNORE targets untrained): pretraining and SFT
    Distill    NextToken mixed with the KL to a teacher's distributions (train/distill.py)
    DPO        the sigmoid preference loss of Rafailov et al. 2023 against a frozen reference
    MaskedLMObjective, Classification, TokenClassification, SpanExtraction, EncoderDistill   encoders:
               masked-LM (+ next-sentence), sequence and token classification, extractive QA,
               DistilBERT's three-term distillation
    Seq2Seq    encoder-decoders: teacher-forced cross-entropy of the target given the source
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tformer.data.sft import IGNORE
from tformer.train.data import to_device
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

    def __init__(self, model, label_smoothing: float = 0.0, compile_: bool = False, scope: str = "model"):
        self.model, self.label_smoothing = model, label_smoothing
        head = model.output
        self.chunked_head = type(head) is nn.Linear and head.bias is None  # not quantized, no adapter
        self._head_loss = linear_cross_entropy
        if compile_ and scope == "blocks":  # regional: each block and the loss head compiled apart
            for layer in model.layers:
                layer.compile()
            self._head_loss = torch.compile(linear_cross_entropy)
        self._loss = torch.compile(self._forward_loss) if compile_ and scope == "model" else self._forward_loss

    def _forward_loss(self, tokens, targets, segments=None):
        hidden = self.model.features(tokens) if segments is None else self.model.features(tokens, segments=segments)
        if self.chunked_head:
            weight = self.model.output.weight
            if hasattr(weight, "to_local"):  # tensor parallelism: a replicated DTensor, whole on every rank
                weight = weight.to_local()
            return self._head_loss(hidden, weight, targets, IGNORE, self.label_smoothing)
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


# --- encoders (models/encoder.py): batches carry attention_mask, token_types and labels ---

def _encode(model, batch: dict):
    return model(batch["tokens"], batch.get("attention_mask"), batch.get("token_types"))


class MaskedLMObjective:
    """BERT pretraining (Devlin et al. 2019): cross-entropy of the masked tokens (`labels`, IGNORE
    elsewhere; data/mlm.py); for the `Pretraining` model plus the next-sentence cross-entropy on
    `nsp_labels`, the two summed as BERT sums them."""
    unit = "tokens"  # masked positions

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict) -> dict:
        out = _encode(self.model, batch)
        logits, nsp_logits = out if isinstance(out, tuple) else (out, None)
        mlm = next_token_loss(logits, batch["labels"])
        if nsp_logits is None:
            return {"loss": mlm}
        nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
        accuracy = (nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        return {"loss": mlm + nsp, "mlm_loss": mlm.detach(), "nsp_loss": nsp.detach(), "nsp_accuracy": accuracy}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class Classification:
    """Cross-entropy of a `SequenceClassifier`'s (B, n_labels) logits against `labels` (B,); logs the
    batch accuracy (macro-F1 needs the whole split: train/encoder_tasks.py's evaluation)."""
    unit = "examples"

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict) -> dict:
        logits = _encode(self.model, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class TokenClassification:
    """Cross-entropy of a `TokenClassifier`'s (B, T, n_labels) logits against `labels` (B, T), IGNORE
    off the words' first sub-tokens (data/tagging.py); logs the accuracy of the labelled tokens."""
    unit = "tokens"

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict) -> dict:
        logits = _encode(self.model, batch).float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        labelled = labels != IGNORE
        right = ((logits.argmax(-1) == labels) & labelled).sum() / labelled.sum().clamp(min=1)
        return {"loss": loss, "accuracy": right}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class SpanExtraction:
    """Extractive QA (a `QuestionAnswering` model, data/qa.py): the mean of the start and end
    positions' cross-entropies, as BERT's SQuAD fine-tuning; a window without the answer points at [CLS]."""
    unit = "examples"

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict) -> dict:
        start, end = _encode(self.model, batch)
        loss = (F.cross_entropy(start.float(), batch["start"]) + F.cross_entropy(end.float(), batch["end"])) / 2
        return {"loss": loss}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class EncoderDistill:
    """DistilBERT's loss (Sanh et al. 2019) for a `MaskedLM` student of a `MaskedLM` teacher, on
    masked-LM batches; over the real (attention_mask) positions:

        loss = alpha_ce * T^2 KL(teacher_T || student_T)        soft targets (train/distill.py's distill_loss)
             + alpha_mlm * CE(student, masked tokens)             hard targets
             + alpha_cos * (1 - cos(h_student, h_teacher))        final hidden states (cosine_loss)

    The teacher runs without gradients; the cosine term needs the two widths equal."""
    unit = "tokens"

    def __init__(self, model, teacher, alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                 temperature: float = 2.0):
        from tformer.train.distill import check_distill_options

        check_distill_options(0.5, temperature, alpha_cos)
        if alpha_ce < 0 or alpha_mlm < 0 or alpha_ce + alpha_mlm + alpha_cos == 0:
            raise ValueError(f"alpha_ce ({alpha_ce}), alpha_mlm ({alpha_mlm}) and alpha_cos ({alpha_cos}) must be "
                             ">= 0 and not all 0")
        if alpha_cos > 0 and model.config.dim != teacher.config.dim:
            raise ValueError(f"the cosine term compares hidden states: the student's dim ({model.config.dim}) must "
                             f"be the teacher's ({teacher.config.dim}); set alpha_cos to 0 or match the width")
        self.model, self.teacher = model, teacher
        self.alpha_ce, self.alpha_mlm, self.alpha_cos, self.temperature = alpha_ce, alpha_mlm, alpha_cos, temperature

    def __call__(self, batch: dict) -> dict:
        from tformer.train.distill import cosine_loss, distill_loss

        args = batch["tokens"], batch.get("attention_mask"), batch.get("token_types")
        with torch.no_grad():
            t_hidden = self.teacher.encoder(*args)
            t_logits = self.teacher.head(t_hidden)
        hidden = self.model.encoder(*args)
        logits = self.model.head(hidden)  # (B, T, V)
        real = (batch["attention_mask"] if batch.get("attention_mask") is not None
                else torch.ones_like(batch["tokens"])).bool()
        ce = distill_loss(logits[real], t_logits[real], batch["labels"][real], 1.0, self.temperature)
        mlm = next_token_loss(logits, batch["labels"])
        cos = cosine_loss(hidden[real], t_hidden[real])
        loss = self.alpha_ce * ce + self.alpha_mlm * mlm + self.alpha_cos * cos
        return {"loss": loss, "ce_loss": ce.detach(), "mlm_loss": mlm.detach(), "cos_loss": cos.detach()}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


class Seq2Seq:
    """Teacher-forced cross-entropy of an encoder-decoder (models/encoder_decoder.py). A batch holds the
    source `src` (B,S) with an optional `src_mask` (B,S; 1 = real), the decoder inputs `tokens` (B,T)
    (the target shifted right behind a start token), and `targets` (B,T), IGNORE where untrained."""
    unit = "tokens"

    def __init__(self, model, label_smoothing: float = 0.0):
        self.model, self.label_smoothing = model, label_smoothing

    def __call__(self, batch: dict) -> dict:
        logits = self.model(batch["src"], batch["tokens"], batch.get("src_mask"))  # (B, T, V)
        return {"loss": next_token_loss(logits, batch["targets"], self.label_smoothing)}

    def weight(self, batch: dict) -> float:
        return batch["n_targets"]


@torch.no_grad()
def precompute_reference(objective: DPO, data, batch_size: int, device, autocast) -> None:
    """Reference log-probs of every pair, once, with the starting weights (adapters off), stored in
    the splits so DPO's batches carry them and no reference forward runs during training."""
    was_training = objective.model.training
    objective.model.eval()
    for split in (data.train, data.val):
        out = []
        for batch in split.eval_batches(max(batch_size, 8)):
            with autocast or nullcontext():
                logps = objective.reference_logps(to_device(batch, device)).float().cpu()
            out.append(logps.view(2, -1).T)  # (B, 2): chosen, rejected
        split.reference = torch.cat(out)
    objective.model.train(was_training)
    print(f"DPO: reference log-probs of {len(data.train.pairs) + len(data.val.pairs)} pairs precomputed")
