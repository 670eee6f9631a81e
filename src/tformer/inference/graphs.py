"""CUDA graphs of a decode engine: the one mechanism that replays captured work (`capture`).

`CapturedDecode` captures the decode step with the loop's bookkeeping, once per model state, batch
shape and sampling setting, in a graph that does, besides the step:

    token <- the sampled token       slot += 1       history[n] <- token       n += 1   (one kernel)
    done |= token in the stop ids    counts[token] += 1 (repetition penalty)

so the host neither gathers the step's inputs nor launches bookkeeping kernels. A graph holds
`steps_per_replay` steps one after another, so the host replays once every few tokens. The loop's
last tokens, and with stop ids the tokens up to each check (every `sync_every`), take graphs of fewer
steps, so a loop never runs past its limit or a check; it streams and returns the same tokens as one
step a replay.

`CapturedPrefill` does the same for the prompt's forward and first sample, with prompts padded to a
multiple of `bucket` tokens so that nearby lengths share a graph.

A graph keeps the addresses it was captured with: the model's weights and KV caches (the engine
keeps its caches across calls), the engine's kernel workspace, and the static state below, which
each call fills in. A model whose tensors moved (another cache size, a module swap) gets a new
capture (`model_key`); after other in-place changes call `reset()`. Without CUDA, the same functions
run step by step with no graph.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict

import torch

from tformer.inference.steps import compiled, compiled_prefill, decode_step, note_tokens
from tformer.inference.sampling import SamplingConfig
from tformer.inference.kernels.record import record_step


def record(nxt, token, input_pos, history, n, done, stop, counts, workspace=None) -> None:
    """The loop's work on new tokens nxt (B,), in place: history[n] <- nxt, n += 1, token <- nxt, the
    slot input_pos moves on by one (one kernel on the kernels' device, `record_step`), then `note_tokens`."""
    record_step(nxt, token, input_pos, history, n, pdl=None if workspace is None else workspace.pdl)
    note_tokens(nxt, done, stop, counts)


def advance(model, sampling: SamplingConfig, workspace, token, input_pos, key_mask, counts, history, n, done,
            stop) -> None:
    """One decode step and its bookkeeping: token (B, 1) at slot input_pos (1,) -> the next token,
    recorded (`record`)."""
    nxt = decode_step(model, token, input_pos, key_mask, sampling, counts, workspace)
    record(nxt, token, input_pos, history, n, done, stop, counts, workspace)


@dataclasses.dataclass
class _State:
    """Static tensors of one capture, and its graphs, each captured when a replay first needs it."""
    token: torch.Tensor  # (B, 1)
    input_pos: torch.Tensor  # (1,)
    key_mask: torch.Tensor  # (B, slots)
    history: torch.Tensor  # (slots + 1, B): row i is the i-th new token
    n: torch.Tensor  # (1,) rows of history written
    done: torch.Tensor  # (B,) bool
    stop: torch.Tensor | None  # (n_stop,)
    counts: torch.Tensor | None  # (B, V)
    graphs: dict = dataclasses.field(default_factory=dict)  # steps -> a CUDA graph of that many steps

    def args(self, clone: bool = False) -> tuple:
        c = (lambda t: t if t is None else t.clone()) if clone else (lambda t: t)
        return (c(self.token), c(self.input_pos), self.key_mask, c(self.counts), c(self.history), c(self.n),
                c(self.done), self.stop)


class _Captures:
    """CUDA graphs kept by key (model state, shapes, sampling): at most `max_captures`, the least recently
    used dropped first."""

    def __init__(self, warmup: int, max_captures: int):
        self.warmup, self.max_captures = warmup, max_captures
        self._states: OrderedDict = OrderedDict()

    def reset(self) -> None:
        """Forget every capture (and free its memory)."""
        self._states.clear()

    def _entry(self, key, make):
        """The state kept under `key`, now the most recently used; make() makes it if there is none."""
        if key in self._states:
            self._states.move_to_end(key)
        else:
            if len(self._states) >= self.max_captures:
                self._states.popitem(last=False)
            self._states[key] = make()
        return self._states[key]


class CapturedDecode(_Captures):
    """The decode loop replayed from CUDA graphs (module docstring).

    advance: `advance` or a compiled copy; default `torch.compile(advance, fullgraph=True)` with
    inductor and no CUDA graph of its own. max_captures: captures kept (each holds its graphs and
    their memory); past it the least recently used one is dropped. steps_per_replay: decode steps a
    graph holds (module docstring)."""

    def __init__(self, advance_fn=None, warmup: int = 2, max_captures: int = 8, steps_per_replay: int = 4):
        if steps_per_replay < 1:
            raise ValueError(f"steps_per_replay must be >= 1, got {steps_per_replay}")
        super().__init__(warmup, max_captures)
        self.advance = advance_fn or compiled(advance)
        self.steps_per_replay = steps_per_replay

    def loop(self, model, first, key_mask, counts, L: int, max_new_tokens: int, sampling: SamplingConfig,
             stop_ids, on_tokens, sync_every: int, workspace=None) -> list[list[int]]:
        """`steps.decode_loop`'s contract: rows of new tokens (B, up to max_new_tokens), first included."""
        st = self._state(model, first.shape[0], key_mask.shape[1], sampling, counts, sorted(stop_ids or []))
        st.input_pos.fill_(L - 1)  # the prompt's last slot; `record` moves it on to the first token's
        st.key_mask.copy_(key_mask)
        st.n.zero_()
        st.done.zero_()
        if counts is not None:
            st.counts.copy_(counts)
        record(first, st.token, st.input_pos, st.history, st.n, st.done, st.stop, st.counts, workspace)
        produced, shown = 1, 0
        while True:
            for row in range(shown, produced):  # the new tokens, one callback each, in order
                if on_tokens is not None and on_tokens(st.history[row]):
                    return st.history[:row + 1].T.tolist()
            shown = produced
            if produced == max_new_tokens or (st.stop is not None and produced % sync_every == 0
                                              and bool(st.done.all())):
                break
            steps = min(self.steps_per_replay, max_new_tokens - produced)
            if st.stop is not None:  # no further than the next check
                steps = min(steps, sync_every - produced % sync_every)
            self._step(model, sampling, workspace, st, steps)
            produced += steps
        return st.history[:produced].T.tolist()

    def _state(self, model, B: int, slots: int, sampling, counts, stop: list[int]) -> _State:
        key = (model_key(model), B, slots, dataclasses.astuple(sampling), counts is None, tuple(stop))
        device = next(model.parameters()).device
        return self._entry(key, lambda: _State(
            token=torch.zeros(B, 1, dtype=torch.long, device=device),
            input_pos=torch.zeros(1, dtype=torch.long, device=device),
            key_mask=torch.zeros(B, slots, dtype=torch.long, device=device),
            history=torch.zeros(slots + 1, B, dtype=torch.long, device=device),
            n=torch.zeros(1, dtype=torch.long, device=device),
            done=torch.zeros(B, dtype=torch.bool, device=device),
            stop=torch.tensor(stop, dtype=torch.long, device=device) if stop else None,
            counts=None if counts is None else torch.zeros_like(counts),
        ))

    def _step(self, model, sampling, workspace, st: _State, steps: int) -> None:
        """`steps` decode steps: one replay of a graph of that many (captured first if new), or
        without CUDA, `advance` that many times."""
        if st.token.device.type != "cuda":
            for _ in range(steps):
                self.advance(model, sampling, workspace, *st.args())
            return
        if steps not in st.graphs:
            st.graphs[steps] = self._capture(model, sampling, workspace, st, steps)
        st.graphs[steps].replay()

    def _capture(self, model, sampling, workspace, st: _State, steps: int) -> torch.cuda.CUDAGraph:
        """Warm up on copies of the state (compiles, autotunes; the KV cache writes at these slots
        are made again by the replay before anything reads them), then capture `steps` calls of
        `advance` on the state itself."""
        def run(clone: bool) -> None:
            args = st.args(clone)
            for _ in range(steps):
                self.advance(model, sampling, workspace, *args)

        return capture(run, self.warmup, st.token.device)[0]


def model_key(model) -> tuple:
    """What a capture depends on in `model`: the model and the addresses of its parameters and buffers."""
    return id(model), tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def capture(fn, warmup: int, device) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, fn's output tensors in it): fn(clone=True) `warmup` times on a side stream (compiles,
    autotunes; fn must then work on copies of its state), then fn(clone=False) captured. Inside
    `fork_rng`, so a seeded call draws as a replaying one does."""
    side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.random.fork_rng(devices=[device]):
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(True)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = fn(False)
    return graph, out


@dataclasses.dataclass
class _Prompt:
    """Static inputs of one prefill capture, and its output (the first new tokens) once captured."""
    tokens: torch.Tensor  # (B, L)
    input_pos: torch.Tensor  # (L,)
    key_mask: torch.Tensor  # (B, slots)
    counts: torch.Tensor | None  # (B, V)
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # (B,)


class CapturedPrefill(_Captures):
    """The prompt's forward and first sample replayed from a CUDA graph, captured once per model state,
    prompt shape and sampling setting. The engine left-pads prompts to a multiple of `bucket` tokens
    (`padded_length`: masked padding), so prompts of nearby lengths share a capture. prefill_fn:
    the function captured (default: `compiled_prefill()`, which has no CUDA graph of its own). Without CUDA
    it runs prefill_fn directly. At most `max_captures` graphs are kept (least recently used
    dropped); `reset()` drops them all."""

    def __init__(self, prefill_fn=None, bucket: int = 64, warmup: int = 2, max_captures: int = 8):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1 token, got {bucket}")
        super().__init__(warmup, max_captures)
        self.prefill = prefill_fn or compiled_prefill()
        self.bucket = bucket

    def padded_length(self, length: int) -> int:
        """The prompt length a batch whose longest prompt has `length` tokens is padded to (a multiple of
        `bucket`)."""
        return -(-length // self.bucket) * self.bucket

    def __call__(self, model, tokens, input_pos, key_mask, sampling: SamplingConfig, counts=None, workspace=None):
        """`prefill`'s contract: the prompts (B, L) into cache slots input_pos (L,) -> first new tokens (B,)."""
        if tokens.device.type != "cuda":
            return self.prefill(model, tokens, input_pos, key_mask, sampling, counts, workspace)
        key = (model_key(model), tuple(tokens.shape), tuple(key_mask.shape), dataclasses.astuple(sampling),
               counts is None)
        st = self._entry(key, lambda: _Prompt(torch.empty_like(tokens), torch.empty_like(input_pos),
                                              torch.empty_like(key_mask),
                                              None if counts is None else torch.empty_like(counts)))
        for static, t in ((st.tokens, tokens), (st.input_pos, input_pos), (st.key_mask, key_mask), (st.counts, counts)):
            if static is not None:
                static.copy_(t)
        if st.graph is None:  # warm-up and replay write the same cache slots with the same keys and values
            st.graph, st.out = capture(lambda clone: self.prefill(model, st.tokens, st.input_pos, st.key_mask,
                                                                  sampling, st.counts, workspace),
                                       self.warmup, tokens.device)
        st.graph.replay()
        return st.out.clone()
