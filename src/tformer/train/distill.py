"""Knowledge distillation: train a student to match a teacher's next-token distributions.

Hinton et al. (2015), as DistilBERT and DistilGPT-2 use it for language models: at each position
the student's loss mixes the ordinary next-token cross-entropy with the KL divergence from the
teacher's softened distribution,

    loss = (1 - alpha) * CE(student, next token) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

t and s are the teacher's and student's logits and T the temperature (T^2 keeps the soft term's
gradient scale independent of T). alpha = 1 trains on the teacher alone. DistilBERT adds a third
term, `distill_cosine` x (1 - cos) between the two models' final hidden states, for students of
the teacher's width. The teacher's full distribution says which tokens it finds plausible, so the
student learns more per token than from the one-hot label; a student distilled this way also
agrees with its teacher more often, which is what a speculative-decoding draft needs
(bench/speculative.py).

`tformer train --teacher CKPT` turns it on. Teacher and student share the tokenizer (the run
takes the teacher's); their vocabularies may differ only in padding rows past the tokenizer's
size, which the loss leaves out. The teacher runs in eval mode without gradients. With
`--distill_init` a student of the teacher's width starts from the teacher's own weights
(`init_from_teacher`, DistilBERT's initialisation).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tformer.tokenizer import Tokenizer


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 alpha: float = 0.5, temperature: float = 1.0, vocab_size: int | None = None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over positions of the mixed loss above. logits (B, T, V_s) and (B, T, V_t), targets (B, T);
    both logits are cut to the first `vocab_size` entries (default: the smaller V)."""
    V = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :V].flatten(0, -2).float()  # (N, V)
    t = teacher_logits[..., :V].flatten(0, -2).float()
    loss = torch.zeros((), device=s.device)
    if alpha < 1:
        loss = (1 - alpha) * F.cross_entropy(s, targets.flatten(), label_smoothing=label_smoothing)
    if alpha > 0:
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        loss = loss + alpha * temperature**2 * kl
    return loss


def check_distill_options(alpha: float, temperature: float, cosine: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill_alpha must be in [0, 1] (the teacher's share of the loss), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {temperature}")
    if cosine < 0:
        raise ValueError(f"distill_cosine must be >= 0, got {cosine}")


def teacher_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a teacher checkpoint (tformer or HF directory) was trained with."""
    try:
        return Tokenizer.load(path)
    except FileNotFoundError:
        raise ValueError(f"the teacher {path} has no tokenizer.json: a student must share its teacher's "
                         "tokenizer, so distill from a checkpoint that holds one") from None


def check_same_tokenizer(run: Tokenizer, teacher: Tokenizer, teacher_path: str | Path) -> None:
    if run.to_str() != teacher.to_str():
        raise ValueError(f"the run's tokenizer differs from the teacher's ({teacher_path}/tokenizer.json); "
                         "leave --tokenizer at its default (the run then takes the teacher's) or pass that file")


def load_teacher(path: str | Path, device, vocab_size: int, seq_len: int) -> nn.Module:
    """The teacher in eval mode with frozen weights; its vocabulary must cover the tokenizer's and
    its context the run's seq_len."""
    from tformer.checkpoint import load

    teacher = load(path, device=device).eval().requires_grad_(False)
    if teacher.config.vocab_size < vocab_size:
        raise ValueError(f"the teacher {path} has vocab_size {teacher.config.vocab_size}, smaller than "
                         f"its tokenizer's {vocab_size}")
    if teacher.config.max_seq_len < seq_len:
        raise ValueError(f"the teacher {path} reads at most {teacher.config.max_seq_len} tokens; lower "
                         f"--seq_len from {seq_len}")
    return teacher


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[int]:
    """Copy the teacher's weights into a shallower student of the same width, as DistilBERT starts
    its 6 layers from BERT's 12: embeddings, final norm and head as they are, and evenly spaced
    layers (student layer i <- teacher layer i * L_teacher // L_student; every other one for half
    the depth). An encoder with heads (models/encoder.py) keeps its layers under `encoder.`.
    Returns the teacher layers taken."""
    L_s, L_t = len(_trunk(student).layers), len(_trunk(teacher).layers)
    if L_s > L_t:
        raise ValueError(f"distill_init: the student has {L_s} layers, more than the teacher's {L_t}")
    taken = [i * L_t // L_s for i in range(L_s)]
    source = teacher.state_dict()
    state, wrong = {}, []
    layers = "encoder.layers." if _trunk(student) is not student else "layers."
    for name, param in student.state_dict().items():
        if name.startswith(layers):
            i, rest = name[len(layers):].split(".", 1)
            name_t = f"{layers}{taken[int(i)]}.{rest}"
        else:
            name_t = name
        value = source.get(name_t)
        if value is None or value.shape != param.shape:
            wrong.append(f"{name} {tuple(param.shape)} vs {name_t} {None if value is None else tuple(value.shape)}")
        else:
            state[name] = value
    if wrong:
        raise ValueError("distill_init copies the teacher's weights, so the student must have its shape but for "
                         "n_layers (leave the other --model.* options out); these differ: " + "; ".join(wrong[:4]))
    student.load_state_dict(state)
    return taken


def _trunk(model: nn.Module) -> nn.Module:
    """The module holding `layers`: the model, or an encoder head model's `encoder`."""
    return model if hasattr(model, "layers") else model.encoder


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cos(student, teacher) between final hidden states (B, T, C):
    DistilBERT's third term, which aligns the directions of the two models' representations."""
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def make_distill_loss_fn(model, teacher, vocab_size: int, alpha: float, temperature: float,
                         label_smoothing: float = 0.0, cosine: float = 0.0, compile_: bool = False):
    """(x, y) -> the student's distillation loss (+ cosine x `cosine_loss` of the final hidden
    states when cosine > 0); compiled with both forwards in one graph."""
    if cosine > 0 and model.config.dim != teacher.config.dim:
        raise ValueError(f"distill_cosine compares hidden states, so the student's dim ({model.config.dim}) must be "
                         f"the teacher's ({teacher.config.dim}); set distill_cosine to 0 or match the width")

    def forward_loss(x, y):
        with torch.no_grad():
            teacher_hidden = teacher.features(x)
            teacher_logits = teacher.output(teacher_hidden)
        hidden = model.features(x)
        loss = distill_loss(model.output(hidden), teacher_logits, y, alpha, temperature, vocab_size, label_smoothing)
        return loss + cosine * cosine_loss(hidden, teacher_hidden) if cosine > 0 else loss

    return torch.compile(forward_loss) if compile_ else forward_loss
