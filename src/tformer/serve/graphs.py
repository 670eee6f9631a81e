"""The running batch's decode forward on static buffers, replayed from CUDA graphs on a GPU.

A decode step feeds B rows one token each, at their own positions, with their own block tables.
Its launch cost (a few thousand kernels for a 1B model) dwarfs the work at small batches, so the
step is captured once per shape and replayed. Shapes are bucketed: B rows run as the next batch
size of `batch_sizes` (powers of two up to max_rows) and the tables as the next width of `widths`
(powers of two of blocks up to the context), so a handful of graphs covers every batch:

    staging (R, 2 + M) int64 on the device        R = max_rows, M = blocks of the longest context
        [:, 0] token   [:, 1] position   [:, 2:] block table (0 past a row's blocks)
    bucket (b, m): tokens staging[:b, :1], positions staging[:b, 1:2], tables staging[:b, 2:2 + m]
                   -> logits (b, V) of the last position

Rows past the batch (padding) hold token 0 at position 0 with an all-zero table: they write their
KV into block 0, which no request holds, and nothing reads it unmasked (serve/blocks.py). Without
CUDA (or with capture off) the same bucketed forward runs eagerly, which is what CPU tests check.
"""

from __future__ import annotations

import torch


def _powers_of_two(limit: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < limit:
        sizes.append(min(2 * sizes[-1], limit))
    return sizes


class DecodeGraphs:
    """Bucketed decode forwards of `model`, whose attention layers read the paged cache through
    `table` (serve/blocks.py PageTable). capture: record CUDA graphs of every bucket (CUDA only)."""

    def __init__(self, model, table, block_size: int, max_rows: int, max_blocks: int, capture: bool):
        self.model, self.table, self.block_size = model, table, block_size
        self.device = model.tok_emb.weight.device
        self.batch_sizes, self.widths = _powers_of_two(max_rows), _powers_of_two(max_blocks)
        self.staging = torch.zeros(max_rows, 2 + max_blocks, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need a model on a CUDA device")
            self._capture_all()

    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) of n rows, each one token at its position with its block table."""
        n = len(tokens)
        b = next(s for s in self.batch_sizes if s >= n)
        m = next(w for w in self.widths if w >= max(len(t) for t in tables))
        host = torch.zeros(b, 2 + m, dtype=torch.long)
        host[:n, 0], host[:n, 1] = torch.tensor(tokens), torch.tensor(positions)
        for row, blocks in enumerate(tables):
            host[row, 2: 2 + len(blocks)] = torch.tensor(blocks)
        self.staging[:b, : 2 + m].copy_(host)
        if (b, m) in self.graphs:
            graph, logits = self.graphs[b, m]
            graph.replay()
            return logits[:n]
        return self._forward(b, m)[:n]

    def _forward(self, b: int, m: int) -> torch.Tensor:
        s = self.staging
        self.table.tables = s[:b, 2: 2 + m]
        self.model.cache_slots = m * self.block_size
        hidden = self.model.features(s[:b, :1], input_pos=s[:b, 1:2])
        return self.model.output(hidden[:, -1])  # (b, V)

    def _capture_all(self) -> None:
        """One graph per (batch size, width), all in one memory pool: they never run at once."""
        self.staging.zero_()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles, lazy inits)
            for b in self.batch_sizes:
                self._forward(b, self.widths[-1])
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b in reversed(self.batch_sizes):  # largest first: later captures fit in what it freed
            for m in reversed(self.widths):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b, m)
                self.graphs[b, m] = (graph, logits)
        torch.cuda.synchronize(self.device)
