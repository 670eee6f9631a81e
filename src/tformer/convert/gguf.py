"""GGUF files (llama.cpp's format) <-> tformer models, tokenizers and chat templates.

A GGUF file of the llama or qwen2 architecture is llama.cpp's spelling of an HF checkpoint: its
`{arch}.*` metadata keys are config.json fields, its tensor names map one to one onto HF's, and the
tokenizer and chat template travel in the metadata (`gguf_tokenizer`). Import renames both to HF's
spelling and goes through `convert.hf` (`config_from_hf`, `state_dict_from_hf`); export goes back the
same way. Tensors change in these ways only:

    F16, BF16, Q8_0, Q4_0, Q4_1 blocks (`READ_TYPES`)   -> float32, by `gguf.quants.dequantize`
    llama q/k rows, interleaved RoPE pairs per head     -> rotate-half order (`interleaved_to_half`):
                                                           llama.cpp's converter permutes them; qwen2's not
    export: 2-D weights F16 or Q8_0 (`FILE_TYPES`)       <- float32; norms stay F32, as llama.cpp writes them

The reader gives each tensor in numpy (rows, cols) order, which is our (out, in).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

from tformer.checkpoint import load, model_from_tensors, save, tokenizer_for
from tformer.config import ConfigError, ModelConfig
from tformer.convert.gguf_tokenizer import CHAT_TEMPLATE, tokenizer_from_gguf, write_tokenizer
from tformer.convert.hf import state_dict_from_hf, state_dict_to_hf
from tformer.convert.hf_config import config_from_hf, config_to_hf
from tformer.io import CheckpointError, atomic_path, atomic_write_text, read_json
from tformer.models.decoder import Decoder
from tformer.nn.rope import interleaved_to_half
from tformer.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from tformer.tokenizer import Tokenizer

__all__ = ["FILE_TYPES", "READ_TYPES", "GGUFModel", "checkpoint_to_gguf", "gguf_to_checkpoint", "load_gguf",
           "read_chat_template", "save_gguf", "write_chat_template"]  # fmt: skip

Q = gguf.GGMLQuantizationType
READ_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
ARCHS = {"llama": True, "qwen2": False}  # architecture -> are its q/k rows permuted for interleaved RoPE?

# `{arch}.` metadata key -> HF config.json field (ints are written as uint32, floats as float32)
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
_REQUIRED = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")

# GGUF tensor name <-> HF name; {L} is a layer index, {P} weight or bias
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{L}.attn_norm.weight": "model.layers.{L}.input_layernorm.weight",
    **{f"blk.{{L}}.attn_{p}.{{P}}": f"model.layers.{{L}}.self_attn.{p}_proj.{{P}}" for p in "qkv"},
    "blk.{L}.attn_output.{P}": "model.layers.{L}.self_attn.o_proj.{P}",
    "blk.{L}.ffn_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
    **{f"blk.{{L}}.ffn_{g}.{{P}}": f"model.layers.{{L}}.mlp.{g}_proj.{{P}}" for g in ("gate", "up", "down")},
}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{P\}", r"(?P<P>weight|bias)"))


_TO_HF = [(_pattern(g), h) for g, h in _NAMES.items()]
_FROM_HF = [(_pattern(h), g) for g, h in _NAMES.items()]


def _rename(name: str, rules: list) -> str | None:
    for pattern, template in rules:
        if m := pattern.fullmatch(name):
            return template.format(**m.groupdict())
    return None


class GGUFModel(NamedTuple):
    model: Decoder
    tokenizer: Tokenizer
    chat_template: str | None


# --- import ---------------------------------------------------------------------------------------


def load_gguf(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> GGUFModel:
    """The model (eval mode, float32 unless `dtype`), tokenizer and chat template of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a .gguf file")
    source = str(path)
    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    cfg = config_from_gguf(meta, {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}, source)
    tensors = _hf_tensors(reader, cfg, permuted=ARCHS[meta["general.architecture"]], source=source)
    model = model_from_tensors(cfg, state_dict_from_hf(tensors, cfg, source), source, device, dtype)
    return GGUFModel(model, tokenizer_from_gguf(meta, source), meta.get(CHAT_TEMPLATE))


def _hf_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, permuted: bool, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors under HF's names, in float32, q/k rows in rotate-half order."""
    tensors = {}
    for t in reader.tensors:
        name = _rename(t.name, _TO_HF)
        if name is None:
            what = " (Llama 3.1's RoPE scaling factors)" if t.name == "rope_freqs.weight" else ""
            raise CheckpointError(f"{source}: tensor {t.name!r}{what} has no tformer parameter")
        tensors[name] = _dequantize(t, source)
        if permuted and (heads := _qk_heads(name, cfg)):
            tensors[name] = _rope_rows(tensors[name], heads)
    return tensors


def _qk_heads(hf_name: str, cfg: ModelConfig) -> int | None:
    """The heads of a q or k projection (weight or bias), None for any other tensor."""
    return cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads if ".k_proj." in hf_name else None


def config_from_gguf(meta: dict, shapes: dict[str, tuple[int, ...]], source: str = "GGUF file") -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata and tensor shapes ({name: (rows, ...)}); CheckpointError
    naming the key that prevents it."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported; supported: {list(ARCHS)}")
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise CheckpointError(f"{source}: the metadata has no {missing}; the file is incomplete")
    hf = {f: _exact(meta[f"{arch}.{k}"]) for k, f in _CONFIG_KEYS.items() if f"{arch}.{k}" in meta}
    hf["model_type"] = arch
    if "vocab_size" not in hf:  # older files: the tokens, else the embedding's rows
        hf["vocab_size"] = len(meta.get("tokenizer.ggml.tokens", [])) or shapes.get("token_embd.weight", (None,))[0]
    hf["tie_word_embeddings"] = "output.weight" not in shapes
    hf["attention_bias"] = "blk.0.attn_q.bias" in shapes  # llama's flag; qwen2 always has q/k/v biases
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    for key in ("attention.value_length", "rope.dimension_count"):
        if meta.get(f"{arch}.{key}", head_dim) != head_dim:
            raise CheckpointError(f"{source}: {arch}.{key}={meta[f'{arch}.{key}']} differs from the head size "
                                  f"{head_dim}; tformer's {arch} attention needs them equal")  # fmt: skip
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    elif scaling != "none":
        raise CheckpointError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
    try:
        return config_from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _exact(value):
    """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _dequantize(t, source: str) -> torch.Tensor:
    if t.tensor_type not in READ_TYPES:
        raise CheckpointError(
            f"{source}: tensor {t.name!r} is {t.tensor_type.name}, which tformer does not dequantize; it reads "
            f"{[q.name for q in READ_TYPES]}: convert the model with llama.cpp to one of those (e.g. Q8_0 or F16)"
        )
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _rope_rows(t: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """q or k projection rows (H * D, ...) from llama.cpp's interleaved RoPE pairs to rotate-half
    order within each head (`inverse`: back)."""
    order = interleaved_to_half(torch.arange(t.shape[0] // n_heads))  # (D,) ours[j] = theirs[order[j]]
    if inverse:
        order = order.argsort()
    return t.unflatten(0, (n_heads, -1))[:, order].flatten(0, 1)


def gguf_to_checkpoint(path: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a GGUF file as a tformer checkpoint folder: weights dequantized (float32 unless
    `dtype`), tokenizer.json, and the chat template as `chat_template` in tokenizer_config.json,
    where transformers' AutoTokenizer (and `read_chat_template`) find it."""
    model, tokenizer, template = load_gguf(path, dtype=dtype)
    return save(model, out, tokenizer=tokenizer, write_extra=lambda folder: write_chat_template(folder, template))


def read_chat_template(folder: str | Path) -> str | None:
    """The chat template of a checkpoint or HF folder: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or HF's list of named templates: the "default" one); None without one."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    file = folder / TOKENIZER_CONFIG_FILE
    template = read_json(file).get("chat_template") if file.is_file() else None
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def write_chat_template(folder: str | Path, template: str | None) -> None:
    """Store `template` as `chat_template` in the folder's tokenizer_config.json (kept otherwise; written
    after the tokenizer, whose save rewrites that file); nothing for None."""
    if template is not None:
        file = Path(folder) / TOKENIZER_CONFIG_FILE
        cfg = read_json(file) if file.is_file() else {}
        atomic_write_text(file, json.dumps({**cfg, "chat_template": template}, indent=2) + "\n")


# --- export ---------------------------------------------------------------------------------------


def save_gguf(model: Decoder, path: str | Path, tokenizer: Tokenizer | str | Path,
              chat_template: str | None = None, file_type: str = "f16") -> Path:
    """Write `model` with its tokenizer (a Tokenizer, or a path as for `tformer.save`) and chat
    template as one GGUF file that llama.cpp, the `gguf` reader and transformers' GGUF loader open.

    file_type: "f16" or "q8_0" for the 2-D weights (a weight whose rows do not split into Q8_0's
    32-value blocks is written F16), or "f32"; norms are always F32. Llama and qwen2-shaped models only.
    """
    from tformer.quantize import is_quantized

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r} is not supported; choose one of {list(FILE_TYPES)}")
    if is_quantized(model):
        raise ValueError("this model is quantized (tformer.quantize); GGUF export needs full-precision weights: "
                         "convert the checkpoint it was quantized from")  # fmt: skip
    tokenizer = tokenizer_for(model, tokenizer)
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass save_gguf(..., tokenizer=...) a Tokenizer or "
                         "the checkpoint folder the model was loaded from")  # fmt: skip
    cfg = model.config
    hf = _hf_config_for_gguf(cfg)
    arch = hf["model_type"]
    tensors = state_dict_to_hf(model.state_dict(), cfg)
    if ARCHS[arch]:
        for name in [n for n in tensors if _qk_heads(n, cfg)]:
            tensors[name] = _rope_rows(tensors[name], _qk_heads(name, cfg), inverse=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(path.stem)
        writer.add_file_type(FILE_TYPES[file_type])
        for key, field in _CONFIG_KEYS.items():
            value = hf[field]
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
        writer.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.rope.scaling == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope.factor)
        write_tokenizer(writer, tokenizer, cfg.vocab_size)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for name, t in tensors.items():
            data, qtype = _encode(t, file_type)
            writer.add_tensor(_rename(name, _FROM_HF), data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _hf_config_for_gguf(cfg: ModelConfig) -> dict:
    """config_to_hf(cfg), checked to be what a llama.cpp llama or qwen2 file can say."""
    hf = config_to_hf(cfg)  # ConfigError when no HF architecture expresses cfg
    problems = [
        (hf["model_type"] not in ARCHS, f"it is a {hf['model_type']} model; GGUF export writes {list(ARCHS)}"),
        (hf.get("hidden_act") != "silu", f"activation={cfg.activation!r} (llama.cpp's llama and qwen2 use swiglu)"),
        (cfg.rope.scaling not in ("none", "linear"), f"rope.scaling={cfg.rope.scaling!r} (none and linear export)"),
        (cfg.sliding_window is not None, f"sliding_window={cfg.sliding_window} (GGUF llama/qwen2 attend to all)"),
    ]
    for bad, what in problems:
        if bad:
            raise ConfigError(f"this config cannot be written as GGUF: {what}")
    return hf


def _encode(t: torch.Tensor, file_type: str) -> tuple[np.ndarray, Q | None]:
    """(data, the raw type to declare, or None where the writer infers it from the numpy dtype)."""
    a = t.detach().to("cpu", torch.float32).numpy()
    if a.ndim == 1 or file_type == "f32":
        return a, None
    if file_type == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), None


def checkpoint_to_gguf(checkpoint: str | Path, out: str | Path, file_type: str = "f16") -> Path:
    """A tformer checkpoint (or HF folder) with its tokenizer.json and chat template as a GGUF file."""

    checkpoint = Path(checkpoint)
    model = load(checkpoint)
    return save_gguf(model, out, Tokenizer.load(checkpoint), read_chat_template(checkpoint), file_type)
