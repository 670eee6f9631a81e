"""Hand-written GPU kernels (Triton) for the hot paths that torch.compile does not generate well.

Each kernel is a torch custom op with a PyTorch fallback at its call site; its `use_*` function
(`use_matvec`, `use_decode_attention`, `use_cached_attention`, `use_topk_sample`) says whether it applies. Triton is
optional: without it everything runs through PyTorch.
"""

from tformer.kernels.attention import decode_attention, use_decode_attention
from tformer.kernels.fused_attention import cached_attention, use_cached_attention
from tformer.kernels.gemv import StoredWeight, matvec, use_matvec
from tformer.kernels.linear import MatvecLinear

__all__ = ["MatvecLinear", "StoredWeight", "cached_attention", "decode_attention", "matvec", "use_cached_attention",
           "use_decode_attention", "use_matvec"]
