"""GGUF tokenizer metadata <-> a byte-level BPE `tformer.Tokenizer` (an HF tokenizer.json).

A GGUF file of llama.cpp's "gpt2" tokenizer type stores, under `tokenizer.ggml.*`: the tokens by id
(already spelled in GPT-2's byte alphabet), the merges as "a b" strings, a type per token (control
tokens are special, user-defined ones are matched whole), bos/eos/pad ids, and the name of the
pre-tokenizer the vocabulary was trained with (`pre`). Import rebuilds the tokenizer.json the model's
HF repository ships: BPE + the pre-tokenizer `PRE_TOKENIZERS` names + ByteLevel decoding; export
writes the same keys back. A file without `pre` splits as GPT-2 does (llama.cpp's older files).
"""

from __future__ import annotations

import json
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tformer.tokenizer import Tokenizer

PREFIX = "tokenizer.ggml."
CHAT_TEMPLATE = "tokenizer.chat_template"
NORMAL, CONTROL, USER_DEFINED, UNUSED = (int(gguf.TokenType[t]) for t in ("NORMAL", "CONTROL", "USER_DEFINED",
                                                                          "UNUSED"))

# Llama 3's and Qwen2's split regexes, as their tokenizer.json files give them (they differ in digit runs).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(use_regex: bool = True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), _byte_level(False)])


# llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) -> the pre-tokenizer of the HF tokenizer.json
PRE_TOKENIZERS = {
    "gpt-2": _byte_level,  # GPT-2's regex; what `Tokenizer.train_bpe` uses
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),  # Llama 3
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def tokenizer_from_gguf(meta: dict[str, Any], source: str) -> Tokenizer:
    """The Tokenizer a GGUF file's metadata (`{key: field.contents()}`) describes."""
    kind = meta.get(PREFIX + "model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer type {kind!r} is not supported; tformer reads byte-level BPE "
            "tokenizers (tokenizer.ggml.model = 'gpt2': GPT-2, Llama 3, Qwen2, SmolLM)"
        )
    tokens: list[str] = meta[PREFIX + "tokens"]
    types: list[int] = meta.get(PREFIX + "token_type") or [NORMAL] * len(tokens)
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                [tuple(m.split(" ")) for m in meta[PREFIX + "merges"]]))  # fmt: skip
    hf.pre_tokenizer = _pre_tokenizer(meta.get(PREFIX + "pre", "gpt-2"), source)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == CONTROL])  # fmt: skip
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == USER_DEFINED])  # fmt: skip
    ids = {k: i for k, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))
           if (i := meta.get(PREFIX + key)) is not None and 0 <= i < len(tokens)}  # fmt: skip
    names = {k: tokens[i] for k, i in ids.items()}
    ends = [k for k in ("bos", "eos") if meta.get(f"{PREFIX}add_{k}_token") and k in ids]
    if ends:  # transformers then adds the BOS/EOS llama.cpp adds (tformer's encode adds none)
        template = [names["bos"]] * ("bos" in ends) + ["$A"] + [names["eos"]] * ("eos" in ends)
        hf.post_processor = processors.TemplateProcessing(
            single=" ".join(template), special_tokens=[(names[k], ids[k]) for k in ends])
    return Tokenizer(hf, **names)


def _pre_tokenizer(name: str, source: str):
    if name not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{list(PRE_TOKENIZERS)}. Splitting text differently would give other token ids than llama.cpp's"
        )
    return PRE_TOKENIZERS[name]()


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The `PRE_TOKENIZERS` name of `tokenizer`'s pre-tokenizer; ValueError if it has none."""
    ours = json.loads(tokenizer.to_str()).get("pre_tokenizer")
    for name, make in PRE_TOKENIZERS.items():
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = make()
        if json.loads(probe.to_str())["pre_tokenizer"] == ours:
            return name
    raise ValueError(
        f"this tokenizer's pre-tokenizer {json.dumps(ours)} has no llama.cpp name; GGUF export supports "
        f"byte-level BPE tokenizers split as {list(PRE_TOKENIZERS)} (Tokenizer.train_bpe gives 'gpt-2')"
    )


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Add `tokenizer` to `writer` as "gpt2"-type metadata with `vocab_size` tokens: ids the
    tokenizer lacks (a vocabulary padded for speed) become unused `[PAD{id}]` tokens, as llama.cpp's
    converter writes them."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            "GGUF export supports byte-level BPE tokenizers (Tokenizer.train_bpe, GPT-2, Llama 3, Qwen2, "
            f"SmolLM); this one is a {model.get('type')} model with a {(spec.get('decoder') or {}).get('type')} "
            "decoder (a character tokenizer?)"
        )
    pre = pre_tokenizer_name(tokenizer)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]], types[added["id"]] = added["content"], CONTROL if added["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, i in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                   (writer.add_pad_token_id, tokenizer.pad_id)):  # fmt: skip
        if i is not None:
            add(i)
    writer.add_add_bos_token(False)  # tformer encodes prompts with no BOS (see convert.hf)
