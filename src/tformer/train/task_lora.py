"""LoRA and QLoRA for the encoder and encoder-decoder tasks (`tformer finetune CKPT --task ... --method
lora|qlora`), as PEFT configures them: adapters (tformer.adapters.lora; `lora` fields r, alpha, dropout,
targets, rslora) on the chosen Linear layers of a frozen base (QLoRA: in NF4), and a task head that is
trained in full (PEFT's `modules_to_save`: a classifier's head; a masked-LM or encoder-decoder has none).
The finished model has its adapters merged, so OUT/final is a plain checkpoint that `tformer classify` and
`tformer generate` read.
"""

from __future__ import annotations

from torch import nn

from tformer.adapters.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora
from tformer.models.encoder import QuestionAnswering, SequenceClassifier, TokenClassifier

METHODS = ("full", "lora", "qlora")
HEADED = (SequenceClassifier, TokenClassifier, QuestionAnswering)


def adapt(model: nn.Module, method: str, fields: dict) -> str:
    """Apply `method` to `model` in place; a line saying what trains."""
    if method == "full":
        return "training every weight"
    config = LoRAConfig(**{**fields, **({"quantize": "nf4"} if method == "qlora" else {})})
    if isinstance(model, HEADED):
        head = {n: p for n, p in model.named_parameters() if not n.startswith("encoder.")}
    else:
        head = {}
    apply_lora(model, config)
    for p in head.values():
        p.requires_grad_(True)
    n_adapter = sum(p.numel() for p in lora_parameters(model))
    n_head = sum(p.numel() for p in head.values())
    total = sum(p.numel() for p in model.parameters())
    what = f"{method}: r {config.r}, alpha {config.alpha:g}, targets {','.join(config.targets)}; {n_adapter:,} adapter"
    return what + (f" + {n_head:,} head" if head else "") + f" parameters train ({(n_adapter + n_head) / total:.2%})"


def merged(model: nn.Module, method: str) -> nn.Module:
    """The model with its adapters folded in (a plain model), for saving."""
    if method != "full":
        merge_lora(model)
    return model
