"""Running the long-context tasks (tformer.evals.longctx) on a model: the context it is given,
batched greedy decoding, accuracy per (task, length, depth) and the effective length.

A model is run past its max_seq_len only where its positions are computed rather than learned
(RoPE with any scaling, ALiBi, T5's relative bias, sinusoids, none): it is rebuilt with a larger
max_seq_len from the same weights. Learned position tables have no row past max_seq_len, so such
lengths are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import Callable

from tformer.evals.longctx import Example, answer_tokens, make_example, score

# Positions computed at any index: a model with these is evaluated past its max_seq_len.
EXTRAPOLATING = ("rope", "alibi", "t5", "sinusoidal", "none")
DEFAULT_THRESHOLD = 0.85  # RULER's bar is Llama-2-7B's 4K score, 85.6%


def effective_length(by_length: dict[int, float], threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """The longest length L whose accuracy, and every shorter length's, is >= threshold; None when
    the shortest length already falls below it (RULER's effective length, over this grid)."""
    best = None
    for length in sorted(by_length):
        if by_length[length] < threshold:
            break
        best = length
    return best


@dataclass
class LongCtxResult:
    """Per-sample scores of one run, keyed (task, length, depth), and every example's record."""

    tasks: list[str]
    lengths: list[int]
    depths: list[float]
    threshold: float = DEFAULT_THRESHOLD
    scores: dict[tuple[str, int, float], list[float]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def accuracy(self, task: str, length: int, depth: float) -> float:
        return mean(self.scores[task, length, depth])

    def by_length(self, task: str | None = None) -> dict[int, float]:
        """Accuracy per length, averaged over depths (and over tasks when `task` is None)."""
        tasks = self.tasks if task is None else [task]
        return {n: mean(self.accuracy(t, n, d) for t in tasks for d in self.depths) for n in self.lengths}

    def effective_length(self, task: str | None = None) -> int | None:
        return effective_length(self.by_length(task), self.threshold)


def template_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama's BOS), else []."""
    plain = tokenizer.encode("a")
    full = tokenizer.encode_batch(["a"], template=True)[0]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def build_examples(tokenizer, tasks: list[str], lengths: list[int], depths: list[float], samples: int,
                   seed: int = 0, haystack: str | None = None) -> dict[tuple[str, int], list[Example]]:
    """Every prompt of the grid, grouped by (task, length): the group is one batch of equal lengths."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    prefix = template_prefix(tokenizer)
    return {(t, n): [make_example(t, tokenizer, n, d, s, seed, haystack, prefix) for d in depths
                     for s in range(samples)] for t in tasks for n in lengths}


def context_needed(tokenizer, examples: dict[tuple[str, int], list[Example]]) -> tuple[int, int]:
    """(tokens the longest prompt and its answer need, the most answer tokens of any group)."""
    room = {key: max(answer_tokens(tokenizer, e) for e in group) for key, group in examples.items()}
    return max(n + room[t, n] for t, n in examples), max(room.values())


def rope_override(config, scaling: str, factor: float | None, original: int | None) -> dict:
    """The `rope` changes for an eval-time RoPE scaling: `original` defaults to the model's own
    original length, else its max_seq_len (the length it was trained at)."""
    if config.positions != "rope":
        raise ValueError(f"a RoPE scaling was asked for, but the model's positions are {config.positions!r}: "
                         "leave out --rope-scaling")
    changes = {"scaling": scaling}
    if scaling != "none":
        if factor is None:
            raise ValueError(f"RoPE scaling {scaling!r} needs a factor: pass --rope-factor")
        changes["factor"] = factor
        changes["original_max_seq_len"] = original or config.rope.original_max_seq_len or config.max_seq_len
    return changes


def prepare_model(model, context: int, rope: dict | None = None, answer_room: int = 0):
    """(model, note): `model` able to run `context` tokens (the longest prompt and `answer_room` answer
    tokens) with RoPE changed by `rope`, rebuilt from the same weights where its config changes; the
    note says when lengths pass max_seq_len, else None."""
    config, changes, note = model.config, {}, None
    if rope:
        changes["rope"] = rope
    if context > config.max_seq_len:
        if config.positions not in EXTRAPOLATING:
            raise ValueError(f"lengths with their answers need {context} tokens, more than the model's max_seq_len "
                             f"{config.max_seq_len}, and its {config.positions} positions have no row past it: "
                             f"pass lengths up to {config.max_seq_len - answer_room}")
        # an encoder-decoder bounds only absolute positions by max_seq_len (tformer.inference.seq2seq)
        if config.architecture != "encoder_decoder" or config.positions == "sinusoidal":
            changes["max_seq_len"] = context
        positions = _positions(config.replace(**changes) if rope else config)
        note = (f"lengths reach {context} tokens with their answers, past the model's max_seq_len "
                f"{config.max_seq_len}: its {positions} positions are evaluated beyond their training length")
    if not changes:
        return model, note
    return _rebuild(model, config.replace(**changes)), note


def _positions(config) -> str:
    if config.positions != "rope":
        return config.positions
    r = config.rope
    return f"RoPE (scaling {r.scaling}" + (f", factor {r.factor:g})" if r.scaling != "none" else ")")


def _rebuild(model, config):
    from tformer.checkpoint import model_from_tensors
    from tformer.quantize.swap import quantization_spec

    p = next(model.parameters())
    dtype = p.dtype if p.is_floating_point() else None
    return model_from_tensors(config, dict(model.state_dict()), "the loaded model", p.device, dtype,
                              quantization_spec(model))


class _Generator:
    """Greedy continuations of equal-length prompts: the decode engine for a decoder, one-beam search
    for an encoder-decoder (prompt = source, start token = the tokenizer's pad)."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.eos = {tokenizer.eos_id} if tokenizer.eos_id is not None else None
        self.engine, self.start = None, None
        if hasattr(model, "decode_step"):
            if tokenizer.pad_id is None:
                raise ValueError("an encoder-decoder starts its output with the pad token, and this tokenizer "
                                 "names none: add <pad> to its tokenizer")
            self.start = tokenizer.pad_id
        elif getattr(model.config, "architecture", "decoder") != "decoder":
            raise ValueError("an encoder predicts no next token: long-context tasks need a decoder or an "
                             "encoder-decoder checkpoint")
        else:
            from tformer.inference import DecodeEngine, EngineOptions

            self.engine = DecodeEngine(model, EngineOptions(max_batch_size=batch_size))

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[i:i + self.batch_size], max_new_tokens)
        return out

    def _batch(self, prompts, max_new_tokens):
        from tformer.inference import SamplingConfig, beam_search

        if self.engine is not None:
            return self.engine.generate(prompts, max_new_tokens, SamplingConfig(temperature=0.0), self.eos)
        from tformer.inference.seq2seq import EncoderDecoderStepper

        result = beam_search(EncoderDecoderStepper(self.model, self.start), prompts, max_new_tokens,
                             eos_ids=sorted(self.eos or []), beams=1, early_stopping=True)
        return [rows[0] for rows in result.sequences]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def evaluate(model, tokenizer, examples: dict[tuple[str, int], list[Example]], threshold: float = DEFAULT_THRESHOLD,
             batch_size: int = 8, on_group: Callable[[str, int, float], None] | None = None) -> LongCtxResult:
    """Greedy answers to every example, scored (tformer.evals.longctx.score); `on_group(task, length,
    accuracy)` after each (task, length)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    tasks = list(dict.fromkeys(t for t, _ in examples))
    lengths = sorted({n for _, n in examples})
    depths = list(dict.fromkeys(e.depth for group in examples.values() for e in group))
    result = LongCtxResult(tasks, lengths, depths, threshold)
    generate = _Generator(model, tokenizer, batch_size)
    try:
        for (task, length), group in examples.items():
            max_new = max(answer_tokens(tokenizer, e) for e in group)
            outputs = generate([e.ids for e in group], max_new)
            for e, ids in zip(group, outputs):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                s = score(e, text)
                result.scores.setdefault((task, length, e.depth), []).append(s)
                result.records.append({"task": task, "length": length, "depth": e.depth, "sample": e.sample,
                                       "answers": e.answers, "output": text, "score": s})
            if on_group is not None:
                on_group(task, length, mean(s for d in depths for s in result.scores[task, length, d]))
    finally:
        generate.close()
    return result
