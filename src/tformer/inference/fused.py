"""Decode kernels for a whole model, swapped in as classes by a decode engine.

    with_decode_kernels(model, workspace)  # in place; parameters, buffers and state dict unchanged
    without_decode_kernels(model)          # back to the plain classes

At batch 1 a Llama-style block is seven weight reads and a dozen small kernels around them
(norms, residual adds, the SwiGLU product). After the swap a pre-norm block's one-row forward is

    qkv = matvec(x, wqkv, norm=attn_norm)           RMSNorm fused into the product
    a   = cached_attention(qkv, rope, cache)         RoPE, cache write and attention in one kernel
    h   = matvec(a, wo, residual=x)                  + residual in the epilogue
    g   = matvec(h, w1, up=w3, norm=ffn_norm)        silu(w1 h) * (w3 h), one kernel for both weights
    y   = matvec(g, w2, residual=h)

five kernels a layer, rounding as the unfused modules do (README.md beside this file). The final
RMSNorm runs inside the output head's kernel the same way (`FusedDecoder`). The same five
serve a few rows (up to MAX_ROWS tokens in all, at most 16 new tokens a sequence: a speculative
verify, a small batch), where matvec switches to its tensor-core kernel. Every other call (long
prompts, large batches, training, CPU, layers the kernel cannot read such as tinygemm's int4)
runs the unfused code, so a swapped model stays correct everywhere. Linear layers become their
`kernels.linear` classes (the head included; int4 layers unless the engine keeps them on tinygemm),
and every other multi-head attention layer reads its cache through `decode_attention` for one new
token. Only what the kernels compute exactly as the modules do is swapped (`fusable`); anything
else keeps its plain class.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tformer.inference.kernels.attention import decode_attention, use_decode_attention
from tformer.inference.kernels.fused_attention import cached_attention, use_cached_attention
from tformer.inference.kernels.gemv import matvec, use_matvec
from tformer.inference.kernels.linear import MATVEC_CLASSES, MatvecLayer
from tformer.inference.workspace import Workspace
from tformer.models.blocks import Block
from tformer.models.decoder import Decoder
from tformer.nn.attention import Attention, scaled_dot_product
from tformer.nn.kv_cache import RollingKVCache
from tformer.nn.mlp import GatedFeedForward
from tformer.nn.norm import RMSNorm
from tformer.quantize.int4 import Int4Linear


def _stored(linear: nn.Module):
    return linear.stored_weight() if isinstance(linear, MatvecLayer) else None


def _project(linear: nn.Module, x, ws: Workspace, norm: nn.Module | None = None, residual=None,
             after_short_kernel=False):
    """residual + linear(norm(x)), in one kernel where the layer and the norm allow it.
    after_short_kernel: x comes from a short kernel (attention), so the weights load whole while it runs
    (`matvec`'s whole_rows). A residual must come from before the kernel before this one (a block's input,
    or its attention output after the FFN's first kernel): it loads before the wait (`residual_early`)."""
    w = _stored(linear)
    if w is not None and not use_matvec(x, x.shape[-1], w.fmt):
        w = None
    if norm is not None and (w is None or not isinstance(norm, RMSNorm)):
        x, norm = norm(x), None
    if w is None:
        y = linear(x)
        return y if residual is None else residual + y
    norm_args = None if norm is None else (norm.weight, norm.eps)
    return matvec(x, *w, norm=norm_args, bias=linear.bias, residual=residual, whole_rows=after_short_kernel,
                  residual_early=True, counts=ws.merge, pdl=ws.pdl)


def _ffn(ffn: nn.Module, x, norm: nn.Module, ws: Workspace):
    """x + ffn(norm(x)); a SwiGLU FFN over same-format weights as two kernels: RMSNorm, w1, w3 and
    silu(w1 n) * (w3 n) in one, w2 and the residual in the other."""
    gated = isinstance(ffn, GatedFeedForward) and ffn.act is F.silu and isinstance(norm, RMSNorm)
    gate, up = (_stored(ffn.w1), _stored(ffn.w3)) if gated else (None, None)
    if (gate is None or up is None or gate.fmt != up.fmt or not use_matvec(x, x.shape[-1], gate.fmt)
            or ffn.w1.bias is not None or ffn.w3.bias is not None):
        return x + ffn(norm(x))
    g = matvec(x, *gate, norm=(norm.weight, norm.eps), up=up, counts=ws.merge, pdl=ws.pdl)
    return _project(ffn.w2, g, ws, residual=x)


class KernelAttention(Attention):
    """Attention whose one-token steps against a cache run `decode_attention` (grouped heads read in
    place); every other call runs SDPA."""

    workspace: Workspace | None = None

    def core(self, q, k, v, mask=None, dropout_p: float = 0.0):
        if use_decode_attention(q, k, v, mask, dropout_p):
            return decode_attention(q, k, v, mask)
        return scaled_dot_product(q, k, v, mask, dropout_p)


class FusedBlock(Block):
    """A pre-norm Block whose few-row eval forward runs through the fused kernels (module docstring)."""

    def forward(self, x, rope=None, mask=None, input_pos=None):
        if self.training or not use_matvec(x, x.shape[-1]):
            return super().forward(x, rope, mask, input_pos)
        attn, ws = self.attn, self.attn.workspace
        qkv = _project(attn.wqkv, x, ws, norm=self.attn_norm)
        h = _project(attn.wo, self._attend(qkv, rope, mask, input_pos), ws, residual=x, after_short_kernel=True)
        return _ffn(self.ffn, h, self.ffn_norm, ws)

    def _attend(self, qkv, rope, mask, input_pos):
        """attn.attend(...), as one kernel (RoPE, cache write, attention) where it applies."""
        attn, cache = self.attn, self.attn.kv_cache
        unfused = cache is None or isinstance(cache, RollingKVCache)  # a ring's slots are not positions
        k, v = (None, None) if unfused else (cache.k, cache.v)
        if not use_cached_attention(qkv, k, v, mask, rope, attn.n_heads):
            return attn.attend(qkv, rope, mask, input_pos)
        return cached_attention(qkv, rope, k, v, input_pos, mask, attn.n_heads, counts=attn.workspace.merge,
                                pdl=attn.workspace.pdl)


class FusedDecoder(Decoder):
    """A Decoder whose few-row forward applies the final RMSNorm inside the output head's kernel."""

    workspace: Workspace | None = None

    def forward(self, tokens, input_pos=None, attention_mask=None):
        return _project(self.output, self.hidden(tokens, input_pos, attention_mask), self.workspace, norm=self.norm)


def fusable(block: nn.Module) -> bool:
    """Whether the fused kernels compute `block` exactly as its modules do: a pre-norm Block over
    plain multi-head attention (no instance override of its core, such as an attention capture).
    Everything else the block holds (norm kind, FFN kind, quantized layers, masks, positions) the
    fused forward checks per call and leaves to the modules where the kernels do not apply."""
    return type(block) is Block and type(block.attn) is Attention and "core" not in vars(block.attn)


def with_decode_kernels(model: nn.Module, workspace: Workspace, int4: str = "matvec") -> nn.Module:
    """Swap in place: linear layers -> their `kernels.linear` classes (int4 ones only with
    int4="matvec"; "tinygemm" keeps PyTorch's kernel), `fusable` blocks -> FusedBlock, other
    multi-head attention -> KernelAttention, Decoder -> FusedDecoder. Each swapped module keeps
    `workspace` for its kernels."""
    if int4 not in ("matvec", "tinygemm"):
        raise ValueError(f"int4 must be 'matvec' or 'tinygemm', got {int4!r}")
    if has_decode_kernels(model):
        raise ValueError("the model already runs the decode kernels of another engine (with another workspace): "
                         "close that DecodeEngine first, or reuse it")
    for m in list(model.modules()):
        if type(m) is Decoder:
            m.__class__ = FusedDecoder
        elif type(m) in MATVEC_CLASSES and not (type(m) is Int4Linear and int4 == "tinygemm"):
            m.__class__ = MATVEC_CLASSES[type(m)]
        elif fusable(m):
            m.__class__ = FusedBlock
        elif type(m) is Attention and "core" not in vars(m):
            m.__class__ = KernelAttention
        else:
            continue
        m.workspace = workspace
    return model


def has_decode_kernels(model: nn.Module) -> bool:
    """Whether any module of `model` is one of the kernel classes swapped in here."""
    return any(type(m) in _PLAIN for m in model.modules())


_PLAIN = {FusedDecoder: Decoder, FusedBlock: Block, KernelAttention: Attention,
          **{kernel: plain for plain, kernel in MATVEC_CLASSES.items()}}


def without_decode_kernels(model: nn.Module) -> nn.Module:
    """Back to the plain classes, in place."""
    for m in model.modules():
        if type(m) in _PLAIN:
            m.__class__ = _PLAIN[type(m)]
            m.__dict__.pop("workspace", None)
    return model
