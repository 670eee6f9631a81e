"""NF4 base weights for QLoRA (Dettmers et al. 2023), on torchao's NF4Tensor.

    weight (N, K) float -> 16 NF4 levels (normal quantiles), 4 bits a weight, one absmax scale
    per block of 64 weights; the scales themselves quantized to int8 in blocks of up to 256
    ("double quantization"): ~4.13 bits a weight. |w - dequant(w)| <= ~0.14 * the block's absmax
    (half the widest gap between NF4 levels, 1 - 0.7230).

Compute runs in the NF4 tensor's dtype (bf16 by default, QLoRA's compute dtype): the weight is
dequantized to bf16 for each matmul and the result cast back to the activations' dtype.
torchao's NF4Tensor is used because it is maintained, runs on CPU and CUDA, composes with
torch.compile and FSDP2 (it defines the all-gather hooks); a model holding NF4 weights must not be
cast with `model.to(dtype)` (a dtype cast dequantizes an NF4Tensor): cast before quantizing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from contextlib import contextmanager

import torch
from torch import nn

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA's blocksize)
SCALER_BLOCK_SIZE = 256  # scales per int8 double-quantization block (QLoRA: 256)
DIGEST_SAMPLES = 1024  # values a tensor digest reads (see `tensor_digest`)


@contextmanager
def _quiet_torchao():
    """torchao logs a warning at import for each of its C++ extensions that does not load on
    this build (CUDA-only kernels on a CPU machine); NF4 is pure PyTorch and uses none of them."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def _torchao_nf4():
    """(NF4Tensor, linear_nf4, to_nf4), imported on first use: torchao takes seconds to import."""
    try:
        with _quiet_torchao():
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4, to_nf4
    except ImportError as e:
        raise ImportError(
            f"QLoRA's NF4 weights need torchao >= 0.18 ({e}): pip install 'tformer[qlora]' or pip install torchao"
        ) from e
    return NF4Tensor, linear_nf4, to_nf4


def scaler_block_size(numel: int) -> int:
    """The double-quantization block: 256 scales, or the largest divisor of the number of blocks
    below it (torchao needs equal blocks; e.g. SmolLM2's 576x576 wo has 5184 blocks -> 216)."""
    n_blocks = numel // BLOCK_SIZE
    return next(d for d in range(min(SCALER_BLOCK_SIZE, n_blocks), 0, -1) if n_blocks % d == 0)


def nf4_eligible(linear: nn.Module) -> bool:
    """Whether a Linear's weight splits into whole NF4 blocks (others stay in full precision)."""
    return linear.in_features * linear.out_features % BLOCK_SIZE == 0


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the shape and an evenly spaced sample of `t`'s values rounded to bf16.

    Rounding to bf16 makes a checkpoint read in fp32 or in bf16 give the same digest (the bf16
    copy is the fp32 one rounded); reading fp16 may not (fp32 -> fp16 -> bf16 rounds twice).
    """
    flat = t.detach().reshape(-1)
    n = flat.numel()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    if n:
        # float64: in float32, n - 1 past 2**24 may round up to n, an index out of bounds (SmolLM2's embedding)
        idx = torch.linspace(0, n - 1, min(n, DIGEST_SAMPLES), dtype=torch.float64).round().long().to(flat.device)
        sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is an NF4Tensor (out, in). `weight_digest` is the
    `tensor_digest` of the full-precision weight it was quantized from, so the base's identity
    (`tformer.adapters.base_fingerprint`) survives quantization; `orig_dtype` is that weight's
    dtype, which `dequantize` returns to."""

    def __init__(self, weight, bias: torch.Tensor | None, orig_dtype: torch.dtype, weight_digest: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.orig_dtype = orig_dtype
        self.weight_digest = weight_digest
        self._linear_nf4 = _torchao_nf4()[1]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        w = linear.weight
        if not nf4_eligible(linear):
            raise ValueError(f"a {tuple(w.shape)} weight is not a whole number of {BLOCK_SIZE}-weight NF4 blocks")
        to_nf4 = _torchao_nf4()[2]
        q = to_nf4(w.detach().to(compute_dtype).contiguous(), BLOCK_SIZE, scaler_block_size(w.numel()))
        return cls(q, linear.bias, w.dtype, tensor_digest(w))

    def _apply(self, fn, recurse=True):
        """`model.to(device)` moves the NF4 weight; a dtype cast (`model.to(torch.bfloat16)`) keeps
        it in NF4 (as bitsandbytes' 4-bit layers do) and only changes the dtype `dequantize`
        returns. nn.Module's own _apply cannot swap a parameter of this tensor subclass."""
        weight = self._parameters["weight"]
        self._parameters["weight"] = None  # nn.Module._apply skips it
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            new = fn(weight)
        if not isinstance(new, type(weight)):  # a dtype cast dequantizes an NF4Tensor: stay NF4
            self.orig_dtype = new.dtype
            new = weight.to(new.device)
        self.weight = nn.Parameter(new, requires_grad=False)
        return self

    def __deepcopy__(self, memo):
        """A copy with its own NF4 storage (torchao's NF4Tensor.clone re-quantizes with the default
        blocks, which these weights need not divide into)."""
        names, meta = self.weight.__tensor_flatten__()
        inner = {name: getattr(self.weight, name).clone() for name in names}
        weight = type(self.weight).__tensor_unflatten__(inner, meta, self.weight.size(), self.weight.stride())
        new = NF4Linear(weight, self.bias, self.orig_dtype, self.weight_digest).train(self.training)
        memo[id(self)] = new
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear_nf4(x.to(self.weight.dtype), self.weight).to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight the forward uses, in `dtype` (default: the original weight's)."""
        return self.weight.get_original_weight().to(dtype or self.orig_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight."""
        return plain_linear(self.dequantize(dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around `weight` (out, in) and `bias`, without reinitialising anything."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return linear
