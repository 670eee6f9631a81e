"""A thin wrapper over HF `tokenizers`: train byte-level BPE or characters, load any tokenizer.json.

Everything is stored as a standard HF `tokenizer.json`, so what we train loads in `tokenizers` and
`transformers`, and GPT-2's or Llama's tokenizer.json loads here. Special-token ids (bos/eos/pad)
come from a `tokenizer_config.json` next to the file when there is one, else from common names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from tformer.io import atomic_write_text

DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
UNK_TOKEN = "<|unk|>"

# First match wins. `<|endoftext|>` is GPT-2's bos *and* eos; chat markers (`<|im_start|>`) are not
# a bos, but `<|im_end|>` is the eos of chat-tuned Qwen-style vocabularies.
BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"  # HF's file: we read/write only its bos/eos/pad_token keys
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # written for transformers 4.x, which reads the names there

# Where text can be cut into independently encoded chunks: after a newline that ends a non-blank line
# and before a non-space character. Byte-level (GPT-2, Llama-3) pre-tokenizers split there anyway,
# so encoding chunk by chunk gives the same ids as encoding the whole text (`data.shards` checks
# this for the tokenizer at hand, and encodes whole documents when it does not hold).
_CHUNK_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")


def split_into_chunks(text: str) -> list[str]:
    """`text` cut at line starts that no pre-tokenizer merges across (see `_CHUNK_BOUNDARY`)."""
    return [c for c in _CHUNK_BOUNDARY.split(text) if c]


def _token_name(value) -> str | None:
    """A tokenizer_config.json token entry: "<s>", {"content": "<s>", ...} or null."""
    return value.get("content") if isinstance(value, dict) else value


def _read_texts(texts_or_files) -> list[str]:
    """A str is text; a Path (os.PathLike) is a UTF-8 file to read. No text at all is refused: a
    tokenizer trained on nothing has no characters (char) or no merges (BPE)."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    texts = [Path(t).read_text(encoding="utf-8") if isinstance(t, os.PathLike) else t for t in texts_or_files]
    if not any(texts):
        raise ValueError("no text to train a tokenizer on: the texts (or files) given are empty")
    return texts


class Tokenizer:
    """Text <-> token ids. Wraps a `tokenizers.Tokenizer`; see the module docstring."""

    def __init__(self, hf: HFTokenizer, *, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        """`bos`/`eos`/`pad` name the special tokens; left out, they are found by common names."""
        self.hf = hf
        self._names = {"bos": bos, "eos": eos, "pad": pad}
        self._refresh_special_ids()

    def _refresh_special_ids(self) -> None:
        def pick(kind: str, candidates: Sequence[str]) -> int | None:
            given = self._names[kind]
            for name in [given] if given else candidates:
                if (i := self.hf.token_to_id(name)) is not None:
                    return i
            if given:
                raise ValueError(f"{kind} token {given!r} is not in the vocabulary; add it first")
            return None

        self.bos_id = pick("bos", BOS_NAMES)
        self.eos_id = pick("eos", EOS_NAMES)
        self.pad_id = pick("pad", PAD_NAMES)

    # --- training -------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts_or_files, vocab_size: int,
                  special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style): every string round-trips exactly through encode/decode.

        `texts_or_files`: a str, a Path, or an iterable of them (str = text, Path = UTF-8 file).
        `vocab_size` counts the 256 byte tokens and `special_tokens` (ids 0..n-1); a corpus too small
        to support that many merges gives a smaller vocabulary.
        """
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least "
                             f"{floor} (256 bytes + {len(special_tokens)} special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        chunks = (c for text in _read_texts(texts_or_files) for c in split_into_chunks(text))
        hf.train_from_iterator(chunks, trainer)
        return cls(hf)

    @classmethod
    def train_char(cls, texts_or_files, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> Tokenizer:
        """A character-level tokenizer over the characters of the corpus (sorted by code point).

        Stored as a BPE with no merges and a concatenating decoder, so decode reproduces the text
        exactly (spaces and newlines included); unseen characters encode as `<|unk|>`.
        """
        chars = sorted(set().union(*map(set, _read_texts(texts_or_files))))
        specials = list(dict.fromkeys([*special_tokens, UNK_TOKEN]))
        vocab = {tok: i for i, tok in enumerate(specials + [c for c in chars if c not in specials])}
        hf = HFTokenizer(models.BPE(vocab, [], unk_token=UNK_TOKEN))
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(hf)

    # --- files ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or a folder holding one (e.g. a HF model folder); its own
        padding and truncation settings are dropped."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {file}: pass a tokenizer.json or a folder holding one "
                f"(train one with `tformer tokenizer train --out DIR`)"
            )
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON or unknown models
            raise ValueError(
                f"{file} is not a valid HF tokenizer.json ({e}); re-train or re-download it"
            ) from None
        hf.no_padding()  # tformer pads and truncates batches itself (as transformers resets both per call);
        hf.no_truncation()  # a tokenizer.json's own fixed padding would otherwise read as real tokens
        names = {}
        config = file.parent / CONFIG_FILE  # belongs to a file named tokenizer.json only
        if file.name == TOKENIZER_FILE and config.is_file():
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config} is not valid JSON ({e.msg}); fix or delete it") from None
            names = {k: _token_name(cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
            names = {k: v for k, v in names.items() if v and hf.token_to_id(v) is not None}
        return cls(hf, **names)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically; `path` is a folder, or a file name ending in .json.

        Into a folder we also write a minimal tokenizer_config.json and special_tokens_map.json
        naming bos/eos/pad, so the folder loads back with the same ids (here and in
        `transformers.AutoTokenizer`, 4.x and 5.x). Neither file asks transformers to add tokens:
        a prompt gets a BOS only if tokenizer.json's own post-processor adds one.
        """
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_text(file, self.to_str())
        if path.suffix != ".json":
            ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}
            names = {f"{k}_token": self.hf.id_to_token(i) if i is not None else None for k, i in ids.items()}
            cfg = {**names, "tokenizer_class": "PreTrainedTokenizerFast"}
            atomic_write_text(path / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
            specials = {k: v for k, v in names.items() if v is not None}
            atomic_write_text(path / SPECIAL_TOKENS_FILE, json.dumps(specials, indent=2) + "\n")
        return file

    def to_str(self) -> str:
        """The tokenizer.json text (also what the shard cache key hashes)."""
        return self.hf.to_str()

    # --- encode / decode ------------------------------------------------------------------

    def _require(self, kind: str) -> int:
        i = getattr(self, f"{kind}_id")
        if i is None:
            raise ValueError(f"this tokenizer has no {kind} token: add one with add_special_tokens()")
        return i

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<|eos|>") become their single id."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self._require("bos")] if add_bos else []) + ids + ([self._require("eos")] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], template: bool = False) -> list[list[int]]:
        """`encode` of many texts, in parallel across CPU cores (Rust threads).

        template: apply tokenizer.json's post-processor, e.g. BERT's [CLS] text [SEP]."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=template)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def add_special_tokens(self, tokens: Iterable[str]) -> int:
        """Add tokens matched whole in text and never split; returns how many were new."""
        added = self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self._refresh_special_ids()
        return added

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the rows an embedding table needs."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")
