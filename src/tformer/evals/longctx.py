"""Long-context tasks: prompts of an exact token length with facts buried at a chosen depth.

Each task builds, for a tokenizer, a `length` and a `depth` in [0, 1], a prompt of exactly `length`
tokens: an instruction, a haystack of filler with one or more needles inserted, and a question whose
answer follows the prompt. Pieces are tokenised separately and concatenated as ids, so the length
is exact for any tokenizer; filler is cut to the token. Needles go between filler units (lines of
the corpus, sentences of the passkey filler), at the boundary nearest `depth` of the filler.

    passkey     "The pass key is 71432. Remember it." in repeated filler (Mohtashami & Jaggi 2023)
    niah        one "special magic number" sentence in consecutive corpus text (RULER's S-NIAH)
    multikey    the queried key's needle among distractor keys' needles (RULER's MK-NIAH)
    multivalue  one key, several values; every value is expected (RULER's MV-NIAH)
    vartrack    a chain VAR X1 = 12345, VAR X2 = X1, ...; every variable is expected (RULER's VT)

`depth` places the queried needle (multivalue: its first value; vartrack: the chain's first
assignment, its later hops spread evenly after it); distractors go to seeded random depths.
Every example is a function of (seed, task, length, depth, sample): nothing is drawn globally.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

TASKS = ("passkey", "niah", "multikey", "multivalue", "vartrack")

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Keys of the NIAH needles: plain words, so any tokenizer spells them.
KEYS = ("apple", "river", "candle", "garden", "silver", "harbor", "violet", "thunder", "marble", "falcon",
        "lantern", "meadow", "copper", "orchid", "glacier", "saddle", "ember", "willow", "pepper", "canyon",
        "crystal", "beacon", "ribbon", "tundra", "walnut", "anchor", "quartz", "summit", "breeze", "cobalt")
N_KEYS = 4  # multikey: needles in all (one queried); multivalue: values of the key (RULER's defaults)
N_HOPS = 4  # vartrack: assignments in the chain (X1 = v, then N_HOPS - 1 copies; RULER's default)

# RULER's templates, shortened so that every task fits the few hundred tokens of a small model's context.
NIAH_INTRO = "Magic numbers are hidden in the text below. Remember them.\n"
NIAH_NEEDLE = "\nThe magic number for {key} is {value}.\n"


@dataclass
class Example:
    """One prompt. `ids` has exactly `length` tokens; the answer strings are expected in the output."""

    task: str
    length: int
    depth: float
    sample: int
    ids: list[int]
    answers: list[str]
    needle_at: int  # token index where the queried needle starts
    filler: int  # filler tokens in the prompt (the depth is measured over these)


@dataclass
class _Spec:
    """A task instance before it meets a length: text around the haystack, needles with depths."""

    intro: str
    question: str
    needles: list[tuple[float, str]]  # (depth, text); the first is the queried one
    answers: list[str]
    passkey_filler: bool = False


def _value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _passkey(rng: random.Random, depth: float) -> _Spec:
    key = _value(rng, 5)
    return _Spec("A pass key is hidden in the text below. Remember it.\n", "\nWhat is the pass key? The pass key is",
                 [(depth, f"The pass key is {key}. Remember it. {key} is the pass key. ")], [key], passkey_filler=True)


def _niah(rng: random.Random, depth: float, n_keys: int = 1) -> _Spec:
    keys = rng.sample(KEYS, n_keys)
    values = [_value(rng) for _ in keys]
    needles = [(depth if i == 0 else rng.random(), NIAH_NEEDLE.format(key=k, value=v))
               for i, (k, v) in enumerate(zip(keys, values))]
    key = keys[0]
    return _Spec(NIAH_INTRO, f"\nWhat is the magic number for {key}? The magic number for {key} is", needles,
                 [values[0]])


def _multivalue(rng: random.Random, depth: float) -> _Spec:
    key = rng.choice(KEYS)
    values = [_value(rng) for _ in range(N_KEYS)]
    needles = [(depth if i == 0 else rng.random(), NIAH_NEEDLE.format(key=key, value=v)) for i, v in enumerate(values)]
    return _Spec(NIAH_INTRO, f"\nWhat are all the magic numbers for {key}? The magic numbers for {key} are",
                 needles, values)


def _vartrack(rng: random.Random, depth: float) -> _Spec:
    names = []
    while len(names) < N_HOPS:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = _value(rng, 5)
    needles = [(depth + (1 - depth) * i / N_HOPS, f"\nVAR {name} = {value if i == 0 else names[i - 1]}.\n")
               for i, name in enumerate(names)]
    return _Spec("Track the variable assignments in the text below.\n",
                 f"\nWhich variables are assigned the value {value}? Answer: the {N_HOPS} variables assigned "
                 f"{value} are:", needles, names)


SPECS: dict[str, Callable[[random.Random, float], _Spec]] = {
    "passkey": _passkey, "niah": _niah, "multikey": lambda rng, d: _niah(rng, d, N_KEYS),
    "multivalue": _multivalue, "vartrack": _vartrack,
}


def check_tasks(tasks: list[str]) -> list[str]:
    """`tasks`, each checked against TASKS (ValueError naming the unknown one)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown long-context task {unknown[0] if unknown else '(none given)'!r}: "
                         f"choose from {', '.join(TASKS)}")
    return tasks


def _units(tokenizer, haystack: str | None, budget: int, rng: random.Random) -> list[list[int]]:
    """Filler units (token lists) of exactly `budget` tokens in all: the passkey sentences repeated
    (haystack None), or consecutive lines of `haystack` from a seeded line start, wrapping at its end."""
    if haystack is None:
        cycle = [tokenizer.encode(s + ". ") for s in PASSKEY_FILLER.split(". ") if s.strip(". ")]
    elif not haystack.strip():
        raise ValueError("the haystack text is empty: pass some text, or leave it out for the bundled corpus")
    else:
        pos = haystack.find("\n", rng.randrange(len(haystack))) + 1
    units, total = [], 0
    while total < budget:
        if haystack is not None:  # about 8 characters a token covers any tokenizer in one or two rounds
            text, pos = haystack[pos:pos + 8 * budget + 256], pos + 8 * budget + 256
            pos = pos if pos < len(haystack) else 0
            cycle = [u for u in tokenizer.encode_batch(text.splitlines(keepends=True)) if u]
        for unit in cycle:
            units.append(unit[:budget - total])
            total += len(units[-1])
            if total == budget:
                break
    return units


def make_example(task: str, tokenizer, length: int, depth: float, sample: int = 0, seed: int = 0,
                 haystack: str | None = None, prefix: list[int] | None = None) -> Example:
    """The `sample`-th prompt of `task` at `length` tokens and `depth`; `haystack` is the filler text
    (default: the bundled corpus), `prefix` ids that start every prompt (e.g. a BOS token)."""
    check_tasks([task])
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"tformer-longctx|{seed}|{task}|{length}|{depth!r}|{sample}")
    spec = SPECS[task](rng, depth)
    prefix = list(prefix or [])
    intro, question = tokenizer.encode(spec.intro), tokenizer.encode(spec.question)
    needles = [(d, tokenizer.encode(text)) for d, text in spec.needles]
    fixed = len(prefix) + len(intro) + len(question) + sum(len(n) for _, n in needles)
    budget = length - fixed
    if budget < 1:
        raise ValueError(f"length {length} is too short for task {task!r}: its instruction, needles and question "
                         f"take {fixed} tokens of this tokenizer; pass lengths above {fixed}")
    if spec.passkey_filler:
        haystack = None
    elif haystack is None:
        from tformer.data.corpus import shakespeare_text

        haystack = shakespeare_text()
    units = _units(tokenizer, haystack, budget, rng)
    ids, needle_at = _assemble(prefix + intro, units, needles, budget)
    ids += question
    assert len(ids) == length, (len(ids), length)
    return Example(task, length, depth, sample, ids, spec.answers, needle_at, budget)


def _assemble(head: list[int], units: list[list[int]], needles: list[tuple[float, list[int]]],
              budget: int) -> tuple[list[int], int]:
    """head + units with each needle inserted at the unit boundary nearest its depth of the filler;
    returns the ids and where the first (queried) needle starts."""
    bounds, offset = [0], 0
    for unit in units:
        offset += len(unit)
        bounds.append(offset)  # bounds[i]: filler tokens before unit i
    at = [min(range(len(bounds)), key=lambda i: (abs(bounds[i] - d * budget), i)) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda j: (at[j], needles[j][0], j))
    ids, queried, k = list(head), 0, 0
    for i in range(len(units) + 1):
        while k < len(order) and at[order[k]] == i:
            if order[k] == 0:
                queried = len(ids)
            ids += needles[order[k]][1]
            k += 1
        if i < len(units):
            ids += units[i]
    return ids, queried


def score(example: Example, output: str) -> float:
    """The share of the example's answers found in the generated text (RULER's string match):
    1 or 0 for one answer, recall for several (multivalue, vartrack)."""
    text = output.lower()
    return sum(a.lower() in text for a in example.answers) / len(example.answers)


def answer_tokens(tokenizer, example: Example) -> int:
    """Greedy tokens to generate for `example`: its answers written out, plus a little slack."""
    return len(tokenizer.encode(" " + ", ".join(example.answers))) + 4
