"""FLOPs per token and the device's peak, for model FLOP utilisation (MFU).

FLOPs/token = 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B), N the active parameters
that take part in matmuls (embedding lookups excluded; a tied output matrix counted once).
"""

from __future__ import annotations

import torch

from tformer.accounting import training_flops_per_token
from tformer.params import active_breakdown, model_breakdown

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' datasheets.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16
]


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`: 6 N_active + attention
    (`tformer.accounting.training_flops_per_token`; MoE layers count only their top-k experts)."""
    active = active_breakdown(model.config, model_breakdown(model))
    return training_flops_per_token(model.config, seq_len, active)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device, by name; None where unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None
