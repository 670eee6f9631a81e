"""LoRA and QLoRA adapters as module swaps (the model code knows nothing of them).

    model = tformer.load(ckpt)
    apply_lora(model, LoRAConfig(r=8, alpha=16, targets=["attention"]))   # quantize="nf4": QLoRA
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)              # only A and B train
    ...
    save_adapter(model, out, base=ckpt)         # adapter_config.json + adapter_model.safetensors
    with adapters_disabled(model): ...          # the base alone (a DPO reference), no second copy

    model = tformer.load(ckpt)
    load_adapter(model, out)                    # refuses another base
    report = merge_lora(model, probe=tokens)    # plain nn.Linear again: tformer.save(model, merged)

    model, report = load_merged(ckpt, out)      # the same from the two directories
    merge_checkpoint(ckpt, out, merged)         # ... written as a checkpoint (tokenizer, chat template)

lora.py: LoRAConfig, LoRALinear, apply_lora, merge_lora; nf4.py: NF4Linear on torchao's
NF4Tensor; io.py: the adapter directory and the base's fingerprint; merge.py: base checkpoint +
adapter directory -> plain model or checkpoint.
"""

from tformer.adapters.io import AdapterError, base_fingerprint, load_adapter, read_adapter, save_adapter
from tformer.adapters.lora import (
    GROUPS, LoRAConfig, LoRALinear, MergeReport, adapters_disabled, apply_lora, lora_config, lora_layers,
    lora_parameters, lora_state_dict, merge_lora, quantize_nf4, resolve_targets,
)
from tformer.adapters.merge import load_merged, merge_checkpoint
from tformer.adapters.nf4 import NF4Linear, tensor_digest

__all__ = [
    "GROUPS", "AdapterError", "LoRAConfig", "LoRALinear", "MergeReport", "NF4Linear", "adapters_disabled",
    "apply_lora", "base_fingerprint", "load_adapter", "load_merged", "lora_config", "lora_layers",
    "lora_parameters", "lora_state_dict", "merge_checkpoint", "merge_lora", "quantize_nf4", "read_adapter",
    "resolve_targets", "save_adapter", "tensor_digest",
]
