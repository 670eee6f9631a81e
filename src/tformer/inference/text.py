"""Text in, text out: tokenizer + model + `generate`, with stop strings and streaming."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from tformer.inference.engine import generate
from tformer.inference.sampling import SamplingConfig


def load_tokenizer(path: str | Path):
    from tformer.tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a tformer checkpoint or HF model directory")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}: tformer checkpoints and HF model directories keep one beside the weights"
        )
    return Tokenizer.load(file)


class _StopWatcher:
    """Decodes each row as it grows; ends a row at its first stop string, streams row 0."""

    def __init__(self, tokenizer, n_rows: int, stop: list[str], stream: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, stop, stream
        self.ids = [[] for _ in range(n_rows)]
        self.texts = [""] * n_rows
        self.done = [False] * n_rows
        self.shown = 0

    def __call__(self, next_tokens) -> bool:
        for i, t in enumerate(next_tokens.tolist()):
            if self.done[i]:
                continue
            self.ids[i].append(t)
            self.texts[i] = self.tokenizer.decode(self.ids[i])
            cut = _first_stop(self.texts[i], self.stop)
            if cut is not None:
                self.texts[i], self.done[i] = self.texts[i][:cut], True
            elif self.tokenizer.eos_id is not None and t == self.tokenizer.eos_id:
                self.done[i] = True
        if self.stream is not None:
            self._stream(self.texts[0], final=self.done[0])
        return all(self.done)

    def _stream(self, text: str, final: bool) -> None:
        # hold back a possible partial stop string and an incomplete UTF-8 character
        hold = 0 if final else max([len(s) - 1 for s in self.stop] + [0])
        safe = text[: max(len(text) - hold, self.shown)].rstrip("\ufffd")
        if len(safe) > self.shown:
            self.stream(safe[self.shown:])
            self.shown = len(safe)

    def flush(self) -> None:
        if self.stream is not None and len(self.texts[0]) > self.shown:
            self.stream(self.texts[0][self.shown:])
            self.shown = len(self.texts[0])


def prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of `prompt` (a list of ids is taken as is); an empty prompt starts from BOS (or EOS)."""
    ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    if not ids:
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if bos is None:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens and the tokenizer has no BOS/EOS token")
        ids = [bos]
    return ids


def eos_ids(tokenizer) -> set[int] | None:
    return {tokenizer.eos_id} if tokenizer.eos_id is not None else None


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def generate_text(
    model,
    tokenizer,
    prompts: list[str | list[int]],
    max_new_tokens: int = 200,
    sampling: SamplingConfig | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    stream: bool | Callable[[str], None] = False,
) -> list[str]:
    """Completions of `prompts` (text or token ids; the prompt itself excluded). model: a model or a
    DecodeEngine; stream: True writes the first completion to stdout as it grows, a callable receives it."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    writer = stream if callable(stream) else (_write_stdout if stream else None)
    watcher = _StopWatcher(tokenizer, len(prompts), stop or [], writer)
    generate(model, ids, max_new_tokens, sampling, stop_ids=eos_ids(tokenizer), seed=seed, on_tokens=watcher)
    watcher.flush()
    return watcher.texts


def _write_stdout(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def speculative_text(target, draft, tokenizer, prompt: str | list[int], max_new_tokens: int = 200,
                     sampling: SamplingConfig | None = None, stop: list[str] | None = None,
                     seed: int | None = None, k: int = 4):
    """Completion of one prompt with speculative decoding; returns (text, SpecStats). target, draft:
    DecodeEngines or models (tformer.inference.speculative.speculative_generate)."""
    from tformer.inference.speculative import speculative_generate

    new, stats = speculative_generate(target, draft, prompt_ids(tokenizer, prompt), max_new_tokens, k=k,
                                      sampling=sampling, stop_ids=eos_ids(tokenizer), seed=seed)
    text = tokenizer.decode(new)
    cut = _first_stop(text, stop or [])
    return (text if cut is None else text[:cut]), stats
