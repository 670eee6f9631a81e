"""Decode-engine ablations the benchmarks time and `EngineOptions` has no switch for.

Each replaces one of a `DecodeEngine`'s graph objects (its `_decode`, a CapturedDecode, or its
`_prefill`, a CapturedPrefill; tformer.inference.graphs) with an object of the same interface, so
the engine's `generate` runs unchanged around it. Make the engine with compile=True and
cuda_graphs=True first.

    tree_decode(engine)         the decode step in torch.compile's own CUDA-graph tree, one call a token
    uncaptured_prefill(engine)  the prompt's forward compiled but not captured, and not padded
"""

from __future__ import annotations

import torch

from tformer.inference import DecodeEngine
from tformer.inference.steps import COMPILE_OPTIONS, decode_loop, decode_step


class TreeLoop:
    """The decode loop one compiled step a call (tformer.inference.steps.decode_loop), the step replayed
    from inductor's CUDA-graph tree ("reduce-overhead") instead of the engine's CapturedDecode."""

    def __init__(self):
        options = {**COMPILE_OPTIONS, "triton.cudagraphs": True}
        self.step = torch.compile(decode_step, fullgraph=True, options=options)

    def loop(self, *args):
        """CapturedDecode.loop's arguments: decode_loop's without the step function, then the workspace."""
        *loop_args, workspace = args
        return decode_loop(*loop_args, self.step, workspace)

    def reset(self) -> None:
        pass


class UncapturedPrefill:
    """The prompt's forward through the engine's compiled prefill (`prefill_fn`), with no CUDA graph and
    prompts not padded, instead of the engine's CapturedPrefill."""

    def __init__(self, prefill_fn):
        self.prefill_fn = prefill_fn

    def __call__(self, *args):
        return self.prefill_fn(*args)

    def padded_length(self, length: int) -> int:
        return length

    def reset(self) -> None:
        pass


def _check(engine: DecodeEngine) -> None:
    if not engine.uses_graphs:
        raise ValueError("the ablations replace an engine's CUDA graphs: make it with compile=True, cuda_graphs=True "
                         "on a GPU")


def tree_decode(engine: DecodeEngine) -> DecodeEngine:
    """`engine` with its decode loop in inductor's CUDA-graph tree (`TreeLoop`), in place."""
    _check(engine)
    engine._decode = TreeLoop()
    return engine


def uncaptured_prefill(engine: DecodeEngine) -> DecodeEngine:
    """`engine` with its prompt's forward compiled but not captured (`UncapturedPrefill`), in place."""
    _check(engine)
    engine._prefill = UncapturedPrefill(engine.prefill_fn)
    return engine
