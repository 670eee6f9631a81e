"""The decode kernels' state between launches, owned by one engine and sized once for its largest request.

    merge   (M,) int32   counters of in-kernel merges (split attention, split-K products)
    topk    (R * ROW_COUNTERS,) int32   the top-k sampler's histograms and best-so-far, per row
    seeds   (R,) int64   the seeds a decode loop's top-k draws mix with the token's slot

Every counter is zero between kernels (the last program of a merge sets its own back to zero), so
one array serves every kernel of a step. The arrays never move: a captured CUDA graph keeps their
addresses, so they are allocated here, before any capture, and a request larger than the workspace
is refused (by the engine) instead of reallocating under a graph.
"""

from __future__ import annotations

import torch

from tformer.inference.kernels.sampling import ROW_COUNTERS as TOPK_ROW_COUNTERS

MERGE_COUNTERS = 4096  # at least the split-K groups of the largest few-row product (kernels.rows)


class Workspace:
    """Counters and seeds for `max_rows` sequences of a model with `n_heads` query heads on `device`.

    pdl: launch the kernels with programmatic dependent launch where the GPU has it
    (tformer.inference.kernels.base)."""

    def __init__(self, device, max_rows: int, n_heads: int, pdl: bool = True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.max_rows, self.pdl = device, max_rows, pdl
        self.merge = torch.zeros(max(MERGE_COUNTERS, max_rows * n_heads), dtype=torch.int32, device=device)
        self.topk = torch.zeros(max_rows * TOPK_ROW_COUNTERS, dtype=torch.int32, device=device)
        self.seeds = torch.zeros(max_rows, dtype=torch.int64, device=device)

    def reseed(self, rows: int, generator: torch.Generator | None = None) -> None:
        """Draw the first `rows` kept seeds afresh from torch's generator (or `generator`), so a
        `torch.manual_seed` before a request fixes its top-k draws."""
        rng = {} if generator is None else {"generator": generator}
        self.seeds[:rows].copy_(torch.randint(0, 2**62, (rows,), device=self.device, **rng))

    def at_rest(self) -> bool:
        """Whether every counter is back at zero (true between kernels; a debug check)."""
        return not (self.merge.any() or self.topk.any())
