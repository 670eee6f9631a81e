"""The decode engine: everything between a model and its tokens, made once per model.

    engine = DecodeEngine(model, EngineOptions(max_batch_size=4, compile=True))
    rows = engine.generate(prompts, max_new_tokens=100, sampling=SamplingConfig(top_k=50), seed=0)
    engine.close()  # the model's plain classes back

An engine owns, for one model:
- the kernels: on a GPU with Triton (`kernels=None` picks that) the model's classes are swapped for
  kernel-calling ones (tformer.inference.fused); the model's parameters are untouched;
- their workspace (tformer.inference.workspace), allocated once for `max_batch_size` sequences; a
  larger request is refused with an error, never served by reallocating under a captured graph;
- the KV caches, kept across requests of the same shape so that captured graphs stay valid; a
  sliding-window layer's cache holds only its window (`EngineOptions.rolling_cache`);
- the step functions, chosen once here: eager, compiled, or (compile on CUDA) replayed from CUDA
  graphs (tformer.inference.graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tformer.inference.fused import with_decode_kernels, without_decode_kernels
from tformer.inference.graphs import CapturedDecode, CapturedPrefill, advance
from tformer.inference.kernels.base import DEVICE_TYPE, PDL_DEFAULT, triton
from tformer.inference.sampling import SamplingConfig
from tformer.inference.steps import (compiled, compiled_prefill, cut_at_stop, decode_loop, decode_step, left_pad,
                                     prefill, prompt_counts, seeded)
from tformer.inference.workspace import Workspace
from tformer.nn.kv_cache import RollingKVCache


@dataclass
class EngineOptions:
    """How a `DecodeEngine` runs its model.

    max_batch_size: the most sequences one request may hold (sizes the kernel workspace).
    kernels: swap in tformer's decode kernels; None: where they run (CUDA with Triton).
    compile: torch.compile the prompt's forward and the decode step (fullgraph), with
        compile_backend ("inductor"; "aot_eager" or "eager" to debug a compile).
    cuda_graphs: replay both from CUDA graphs (tformer.inference.graphs: prompts padded to a multiple
        of prefill_bucket tokens; the decode loop's bookkeeping inside, steps_per_replay steps a
        graph); without CUDA the same loop runs step by step. None: with compile on CUDA.
    int4: the kernel of an int4 layer's one-row forward, "matvec" (tformer's, fused) or "tinygemm".
    pdl: launch the kernels with programmatic dependent launch on Hopper (TFORMER_PDL's default).
    sync_every: decode steps between the host's checks for every row having stopped.
    rolling_cache: a sliding-window layer keeps only its window's keys (nn.kv_cache.RollingKVCache,
        `Decoder.make_caches(rolling=True)`): its memory is bounded by the window, not the sequence.
    debug: check the kernels' invariants after each request (every merge counter back at zero; one
        host sync), raising if one does not hold.
    """

    max_batch_size: int = 8
    kernels: bool | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    cuda_graphs: bool | None = None
    steps_per_replay: int = 4
    prefill_bucket: int = 64
    max_captures: int = 8
    int4: str = "matvec"
    pdl: bool = PDL_DEFAULT
    sync_every: int = 8
    rolling_cache: bool = True
    debug: bool = False

    def validate(self) -> None:
        for name in ("max_batch_size", "steps_per_replay", "prefill_bucket", "max_captures", "sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.int4 not in ("matvec", "tinygemm"):
            raise ValueError(f"int4 must be 'matvec' or 'tinygemm', got {self.int4!r}")


class DecodeEngine:
    """Generation from one model (module docstring). Also a context manager that closes itself."""

    def __init__(self, model: nn.Module, options: EngineOptions | None = None, **overrides):
        options = options or EngineOptions()
        if overrides:
            options = EngineOptions(**{**options.__dict__, **overrides})
        options.validate()
        architecture = getattr(getattr(model, "config", None), "architecture", "decoder")
        if architecture != "decoder":
            raise ValueError(f"the decode engine generates with decoder-only models, not an {architecture} model "
                             "(an encoder-decoder decodes through tformer.inference.seq2seq)")
        self.model, self.options = model.eval(), options
        self.device = next(model.parameters()).device
        kernels = options.kernels
        if kernels is None:
            kernels = triton is not None and self.device.type == "cuda" == DEVICE_TYPE
        if kernels and (triton is None or self.device.type != DEVICE_TYPE):
            raise ValueError(f"the decode kernels run on {DEVICE_TYPE or 'CUDA GPUs with Triton installed'}, "
                             f"the model is on {self.device.type}: make the engine with kernels=False")
        self.workspace = None
        if kernels:
            self.workspace = Workspace(self.device, options.max_batch_size, model.config.n_heads, options.pdl)
            with_decode_kernels(model, self.workspace, options.int4)
        self._caches, self._cache_key = None, None
        graphs = options.cuda_graphs
        self.uses_graphs = options.compile and self.device.type == "cuda" if graphs is None else graphs
        backend = options.compile_backend
        self.prefill_fn = compiled_prefill(backend) if options.compile else prefill  # unpadded prompts (speculative)
        if self.uses_graphs:
            self._prefill = CapturedPrefill(self.prefill_fn, options.prefill_bucket, max_captures=options.max_captures)
            self._decode = CapturedDecode(compiled(advance, backend) if options.compile else advance,
                                          max_captures=options.max_captures, steps_per_replay=options.steps_per_replay)
        else:
            self._prefill = self.prefill_fn
            self._step = compiled(decode_step, backend) if options.compile else decode_step
        self.spec_rounds = None  # tformer.inference.speculative.SpecRounds, made by a first speculative run

    def __enter__(self) -> DecodeEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the model its plain classes back and drop the caches and graphs."""
        without_decode_kernels(self.model)
        self.model.clear_caches()
        self._caches = self._cache_key = None
        self.reset()

    def reset(self) -> None:
        """Forget every captured graph (after changing the model in place)."""
        if self.uses_graphs:
            self._prefill.reset()
            self._decode.reset()
        if self.spec_rounds is not None:
            self.spec_rounds.reset()

    def attach_caches(self, batch_size: int, n_slots: int, chunk: int = 1) -> int:
        """Attach KV caches for `batch_size` sequences of at least `n_slots` positions (rounded up to a
        multiple of 8), the same buffers as last time when the shape is the same; returns the slots.
        chunk: the most tokens a forward writes in place, one more than the most positions a
        forward goes back (rolling caches, `Decoder.make_caches`)."""
        n_slots = -(-n_slots // 8) * 8
        key = (batch_size, n_slots, chunk)
        if self._cache_key != key:
            self._caches, self._cache_key = None, None  # free the old ones first
            rolling = {"rolling": True, "chunk": chunk} if self.options.rolling_cache else {}
            self._caches, self._cache_key = self.model.make_caches(batch_size, n_slots, **rolling), key
        for cache in self._caches:
            if isinstance(cache, RollingKVCache):
                cache.reset()  # new sequences: a ring's old slots would otherwise stay visible
        self.model.attach_caches(self._caches)
        return n_slots

    def prepare(self, rows: int, sampling: SamplingConfig) -> None:
        """Check a request of `rows` sequences against the workspace and draw its kept top-k seeds
        from torch's generator (so a seed set before this call fixes the request's draws)."""
        if rows > self.options.max_batch_size:
            raise ValueError(f"{rows} prompts at once, but this engine was made for at most "
                             f"{self.options.max_batch_size}: make it with max_batch_size >= {rows}")
        if self.workspace is not None and sampling.temperature > 0:
            self.workspace.reseed(rows)

    def padded_length(self, longest: int, max_new_tokens: int) -> int:
        """The length prompts whose longest has `longest` tokens are padded to: a multiple of the
        prefill bucket when graphs are replayed and there is room, else `longest`."""
        if not self.uses_graphs:
            return longest
        padded = self._prefill.padded_length(longest)
        return padded if padded + max_new_tokens <= self.model.config.max_seq_len else longest

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_ids: set[int] | None = None, seed: int | None = None,
                 on_tokens: Callable[[torch.Tensor], bool] | None = None) -> list[list[int]]:
        """New tokens for each prompt (prompt excluded), ending at a stop id (kept) or the limit.

        on_tokens(next_tokens (B,)) is called each step; returning True stops generation (stop
        strings, streaming)."""
        sampling = sampling or SamplingConfig()
        sampling.validate()
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        model, device, ws = self.model, self.device, self.workspace
        tokens, prompt_mask = left_pad(prompts, length=self.padded_length(
            max((len(p) for p in prompts), default=1), max_new_tokens))
        B, L = tokens.shape
        if L + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_seq_len {model.config.max_seq_len}: shorten the prompt or ask for fewer tokens"
            )
        with seeded(seed, device):
            self.prepare(B, sampling)
            slots = self.attach_caches(B, L + max_new_tokens)
            try:
                key_mask = torch.ones(B, slots, dtype=torch.long, device=device)
                key_mask[:, :L] = prompt_mask.to(device)
                tokens = tokens.to(device)
                counts = prompt_counts(tokens, key_mask[:, :L], model.config.vocab_size, sampling)
                first = self._prefill(model, tokens, torch.arange(L, device=device), key_mask, sampling, counts, ws)
                args = (model, first, key_mask, counts, L, max_new_tokens, sampling, stop_ids, on_tokens,
                        self.options.sync_every)
                if self.uses_graphs:
                    rows = self._decode.loop(*args, ws)
                else:
                    rows = decode_loop(*args, self._step, ws)
            finally:
                model.clear_caches()
        self.check()
        return [cut_at_stop(r, stop_ids) for r in rows]

    def check(self) -> None:
        """With options.debug: raise if a kernel left a merge counter set (tformer/inference/README.md)."""
        if self.options.debug and self.workspace is not None and not self.workspace.at_rest():
            raise RuntimeError("a decode kernel left a merge counter set: the workspace is not at rest "
                               "(a kernel's last program did not reset its group)")


def generate(model: nn.Module | DecodeEngine, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingConfig | None = None, stop_ids: set[int] | None = None, seed: int | None = None,
             on_tokens: Callable[[torch.Tensor], bool] | None = None, options: EngineOptions | None = None
             ) -> list[list[int]]:
    """`DecodeEngine.generate` on an engine, or on a model through an engine made for this call
    (`options`, default EngineOptions sized for these prompts) and closed after it."""
    if isinstance(model, DecodeEngine):
        if options is not None:
            raise ValueError("options belong to the engine: pass them to DecodeEngine(model, options)")
        return model.generate(prompts, max_new_tokens, sampling, stop_ids, seed, on_tokens)
    options = options or EngineOptions(max_batch_size=max(1, len(prompts)))
    with DecodeEngine(model, options) as engine:
        return engine.generate(prompts, max_new_tokens, sampling, stop_ids, seed, on_tokens)
