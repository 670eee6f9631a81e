"""Hand-written GPU kernels (Triton) for the hot paths that torch.compile does not generate well.

Each kernel is a torch custom op with a PyTorch fallback at its call site; `use_matvec(x, in_features)`
says whether it applies. Triton is optional: without it everything runs through PyTorch.
"""

from tformer.kernels.gemv import matvec, use_matvec
from tformer.kernels.linear import MatvecLinear, with_matvec, without_matvec

__all__ = ["MatvecLinear", "matvec", "use_matvec", "with_matvec", "without_matvec"]
