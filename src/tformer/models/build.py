"""Build a model on the meta device, then materialise and initialise it explicitly.

Building on meta costs no memory, so parameter counts of 70B configs are free; weights are
only allocated by `to_empty` on the target device, then filled by `init_weights`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.decoder import Decoder
from tformer.models.encoder import Encoder
from tformer.models.encoder_decoder import EncoderDecoder
from tformer.nn.moe import GroupedExperts, Router
from tformer.nn.position import RelativePositionBias
from tformer.nn.ssd import SSD

ARCHITECTURES = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, init: bool = True
) -> Decoder | Encoder | EncoderDecoder:
    """A Decoder, an Encoder or an EncoderDecoder, as `config.architecture` says. device="meta"
    returns it unallocated (for counting, or loading)."""
    with torch.device("meta"):
        model = ARCHITECTURES[config.architecture](config)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()  # to_empty makes new Parameter objects: tie them again
    reset_buffers(model)
    if init:
        init_weights(model)
    if dtype is not None:
        model.to(dtype)
    return model


def reset_buffers(model: nn.Module, device: str | torch.device | None = None) -> None:
    """Recompute derived, non-persistent buffers (RoPE frequencies, sinusoids, ALiBi slopes).

    Buffers still on the meta device (a model whose weights were assigned from a checkpoint)
    are first allocated on `device`.
    """
    for m in model.modules():
        for name, buf in m.named_buffers(recurse=False):
            if buf is not None and buf.is_meta:
                setattr(m, name, torch.empty_like(buf, device=device))
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


@torch.no_grad()
def init_weights(model: Decoder) -> None:
    """GPT-2 init: N(0, init_std) for weights, zeros for biases, residual projections scaled
    by 1/sqrt(2 n_layers) (Radford et al. 2019, 2.3) when `scale_residual_init` is set."""
    c = model.config
    resid_std = c.init_std / math.sqrt(2 * c.n_layers) if c.scale_residual_init else c.init_std
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            residual = name.endswith(("attn.wo", "cross.wo", "mixer.wo", "ffn.w2", "ffn.shared.w2"))
            std = resid_std if residual else c.init_std
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, GroupedExperts):  # routed experts: as a dense gated FFN, w2 a residual projection
            for pname, p in m.named_parameters():
                nn.init.normal_(p, mean=0.0, std=resid_std if pname == "w2" else c.init_std)
        elif isinstance(m, Router) and m.expert_bias is not None:
            nn.init.zeros_(m.expert_bias)
        elif isinstance(m, SSD):  # its own A_log, dt_bias and D; its children come next in this loop
            m.reset_parameters()
        elif isinstance(m, (nn.Embedding, RelativePositionBias)):
            nn.init.normal_(m.weight, mean=0.0, std=c.init_std)
        elif hasattr(m, "reset_parameters") and not list(m.children()):
            m.reset_parameters()
    if hasattr(model.pos_emb, "weight"):
        nn.init.normal_(model.pos_emb.weight, mean=0.0, std=c.init_std)
    if c.tie_embeddings:  # the tied matrix was drawn as an output Linear; keep it an embedding draw
        nn.init.normal_(model.tok_emb.weight, mean=0.0, std=c.init_std)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once); works on meta models."""
    return sum(p.numel() for p in model.parameters())
