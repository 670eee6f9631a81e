"""tformer's own checkpoint format, and `load` / `save` for any supported directory.

A tformer checkpoint is a directory:
    tformer.json        {"format": "tformer", "version": 1, "model": ModelConfig fields}
    model.safetensors   our parameter names; a tied output matrix is stored once
    tokenizer.json      when saved with a tokenizer (+ tokenizer_config.json, special_tokens_map.json)
A quantized model (`tformer.quantize`) stores its quantized tensors under the same layer names,
and tformer.json gains {"quantization": spec}; `load` rebuilds the quantized modules from it.
An HF model directory (config.json + *.safetensors) is read through `tformer.convert.hf`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from tformer.config import ConfigError, ModelConfig
from tformer.io import CheckpointError, atomic_path, atomic_write_text, load_state_dict_strict, read_json
from tformer.io import read_safetensors_dir, write_safetensors
from tformer.models.build import build_model, reset_buffers
from tformer.models.decoder import Decoder
from tformer.quantize import apply_spec, quantization_spec
from tformer.tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "tformer.json"


def is_tformer_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save(model: Decoder, path: str | Path, tokenizer: Tokenizer | str | Path | None = None,
         extra: dict | None = None, write_extra=None) -> Path:
    """Write `model` and `tokenizer` as a tformer checkpoint directory.

    `tokenizer`: a Tokenizer, or the path of a tokenizer.json or of a folder holding one (such as
    the checkpoint `model` was loaded from: `save(model, out, tokenizer=src)`). Without one the
    checkpoint holds weights only and `tformer generate` cannot read it: a warning says so.
    The directory is written through `tformer.io.atomic_path`, so an interrupted save leaves the
    previous checkpoint at `path` intact. `write_extra(tmp_dir)` may add files (e.g. optimiser
    state) before the directory goes into place.
    """
    path = Path(path)
    tokenizer = tokenizer_for(model, tokenizer)
    with atomic_path(path, directory=True) as tmp:
        tensors = dict(model.state_dict())
        if model.config.tie_embeddings:
            tensors.pop("output.weight", None)
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        meta = {"format": "tformer", "version": FORMAT_VERSION, "model": model.config.to_dict()}
        if (spec := quantization_spec(model)) is not None:
            meta["quantization"] = spec
        meta.update(extra or {})
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        if not (tmp / TOKENIZER_FILE).is_file():
            warn_no_tokenizer(path, "tformer.save")
    return path


def tokenizer_for(model: Decoder, tokenizer: Tokenizer | str | Path | None) -> Tokenizer | None:
    """`tokenizer` as a Tokenizer (a path is loaded), checked to fit the model's vocabulary."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}: save the model with the tokenizer it was trained with"
        )
    return tokenizer


def warn_no_tokenizer(path: Path, saver: str, needs: str = "`tformer generate`") -> None:
    warnings.warn(
        f"{path} has no tokenizer.json, which {needs} needs: pass {saver}(..., tokenizer=...) a Tokenizer "
        "or the checkpoint folder the model was loaded from", UserWarning, stacklevel=3,
    )


def read_config(path: str | Path) -> ModelConfig:
    meta = read_json(Path(path) / CONFIG_FILE)
    if meta.get("format") != "tformer" or "model" not in meta:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} is not a tformer checkpoint config")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer tformer (format {meta['version']}); upgrade tformer to read it"
        )
    try:
        return ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: invalid model config: {e}") from e


def load_tformer(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Decoder:
    meta = read_json(Path(path) / CONFIG_FILE)
    if meta.get("head", "Encoder") != "Encoder":  # an encoder with a task head (tformer finetune --task ...)
        from tformer.train.encoder_models import load_saved

        return load_saved(Path(path), device)[0].to(dtype=dtype)
    config = read_config(path)
    quantization = meta.get("quantization")
    tensors = read_safetensors_dir(path)
    return model_from_tensors(config, tensors, str(path), device, dtype, quantization)


def model_from_tensors(config: ModelConfig, tensors: dict, source: str, device="cpu", dtype=None,
                       quantization: dict | None = None) -> Decoder:
    """Build on meta, assign `tensors` (our names) and materialise on `device`, in eval mode.

    `quantization` (a `tformer.quantize` spec) swaps in the quantized modules before assigning.
    """
    model = build_model(config, device="meta")
    has_output = "output.weight" in model.state_dict()  # a Decoder's; an Encoder has no output head
    if config.tie_embeddings and has_output and "tok_emb.weight" in tensors:
        tensors.setdefault("output.weight", tensors["tok_emb.weight"])
    if quantization is not None:
        try:
            apply_spec(model, quantization)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e
    load_state_dict_strict(model, tensors, source)
    model.tie_weights()
    reset_buffers(model, "cpu")  # buffers were never in the checkpoint: compute them now
    model.to(device=device, dtype=dtype)
    return model.eval()


def load(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Decoder:
    """A model from a tformer checkpoint directory or an HF model directory, in eval mode (as HF's
    `from_pretrained`): call `.train()` on it to continue training. The tokenizer is not attached:
    pass the same path to `Tokenizer.load` (or as `save(..., tokenizer=path)`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a tformer checkpoint or HF model directory")
    if is_tformer_checkpoint(path):
        return load_tformer(path, device, dtype)
    if (path / "config.json").is_file():
        from tformer.convert.hf import load_hf

        return load_hf(path, device, dtype)
    raise CheckpointError(
        f"{path} is neither a tformer checkpoint ({CONFIG_FILE}) nor an HF model directory (config.json)"
    )
