"""Hand-written GPU kernels (Triton) for the decode hot path; see tformer/inference/README.md for
the invariants they share.

Each kernel is a torch custom op with a `use_*` function (`use_matvec`, `use_decode_attention`,
`use_cached_attention`, `use_topk_sample`) that says whether it applies; callers fall back to
PyTorch where it does not. Triton is optional: without it nothing here is used.
"""

from tformer.inference.kernels.attention import decode_attention, use_decode_attention
from tformer.inference.kernels.fused_attention import cached_attention, use_cached_attention
from tformer.inference.kernels.gemv import StoredWeight, matvec, use_matvec
from tformer.inference.kernels.sampling import topk_sample, use_topk_sample

__all__ = ["StoredWeight", "cached_attention", "decode_attention", "matvec", "topk_sample", "use_cached_attention",
           "use_decode_attention", "use_matvec", "use_topk_sample"]
