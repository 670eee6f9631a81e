"""Autotuning for tformer's decode kernels: each configuration timed where it runs, after another kernel.

In a decode step every kernel follows another one. Under programmatic dependent launch its programs
start while that kernel finishes and load what does not depend on it (weight tiles, old cache slots),
so what a configuration costs the step is how far it moves the step's end, not how long it takes
alone: a configuration that loads more before its wait is slower alone and faster in the step.
Triton's autotuner times each configuration alone, after flushing L2. Here (`in_chain`) each one is
timed inside a CUDA graph behind a stand-in for the kernel before it: a kernel that streams 64 MB
(more than the H100's 50 MB L2, so the timed kernel's own bytes come from memory, as in a step
where every layer has its own weights) and lets dependent kernels start as soon as it has begun.
The cost is the graph of (stand-in, kernel) pairs minus the graph of stand-ins alone. Without
programmatic dependent launch the same difference is the kernel's time after a kernel that leaves
L2 full of other bytes.

TFORMER_TUNE=0 times nothing and keeps each list's first configuration; TFORMER_TUNE=alone times
each configuration alone, as Triton does.
"""

from __future__ import annotations

import os

import torch

from tformer.kernels.base import triton, use_pdl

_TUNE = {"enabled": os.environ.get("TFORMER_TUNE", "1") != "0",
         "in_chain": os.environ.get("TFORMER_TUNE", "1") != "alone"}
STAND_IN_BYTES = 64 * 2**20  # what the stand-in streams: more than an H100's L2
_PAIRS, _REPLAYS = 8, 11  # (stand-in, kernel) pairs a graph; graph replays timed


def tuned(configs: list, key: list[str], prune=None):
    """triton.autotune over `configs`, each timed `in_chain` (module docstring): each new key times
    them all (those `prune(configs, named_args)` keeps, if given) and keeps the fastest, unless
    TFORMER_TUNE=0, which launches the first (each list puts a good default first) and times nothing,
    for quick starts and tests."""
    def first_unless_tuning(configs, named_args, **kwargs):
        configs = prune(configs, named_args) if prune is not None else configs
        return configs if _TUNE["enabled"] else configs[:1]

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": first_unless_tuning},
                           do_bench=_bench)


def _bench(kernel_call, quantiles):
    if _TUNE["in_chain"] and torch.cuda.is_available():
        return in_chain(kernel_call, quantiles)
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


if triton is not None:
    import triton.language as tl

    from tformer.kernels.base import _wait_for_previous_kernel

    @triton.jit
    def _stand_in_kernel(src_ptr, out_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
        """Sums its share of src (n values, a multiple of BLOCK) into out; lets the next kernel start
        at once."""
        _wait_for_previous_kernel(PDL)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            acc += tl.load(src_ptr + start + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def in_chain(kernel_call, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """Milliseconds that kernel_call() adds to a CUDA graph after a kernel streaming STAND_IN_BYTES (module
    docstring), at `quantiles` over the replays; kernel_call launches one kernel on the current stream."""
    device = torch.device("cuda", torch.cuda.current_device())
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    src = torch.ones(STAND_IN_BYTES // 2, dtype=torch.bfloat16, device=device)
    out = torch.empty(programs, dtype=torch.float32, device=device)
    pdl = use_pdl(device)

    def stand_in():
        _stand_in_kernel[(programs,)](src, out, src.numel(), PDL=pdl, BLOCK=4096, num_warps=8, launch_pdl=pdl)

    kernel_call()  # compiles (outside the capture); errors such as OutOfResources reach the autotuner here
    stand_in()
    torch.cuda.synchronize()
    both, alone = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(_PAIRS):
            stand_in()
            kernel_call()
    with torch.cuda.graph(alone):
        for _ in range(_PAIRS):
            stand_in()
    costs = []
    for _ in range(_REPLAYS):
        costs.append((_replay_ms(both) - _replay_ms(alone)) / _PAIRS)
    costs.sort()
    return [costs[round(p * (len(costs) - 1))] for p in quantiles]


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
