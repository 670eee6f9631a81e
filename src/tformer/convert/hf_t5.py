"""HF `T5ForConditionalGeneration` checkpoints (T5 v1.0 and v1.1) <-> tformer `EncoderDecoder`.

The HF names live only here, as one key map used in both directions. Tensors change in one way:
self-attention q | k | v are concatenated into our wqkv rows, and cross-attention k | v into wkv.
HF keeps the relative position bias in the first block of each stack; ours sits on the stack
(`enc_bias`, `dec_bias`). HF's FFN names: `wi` / `wo` (ReLU), `wi_0` (gate) / `wi_1` (up) / `wo`
(gated GELU) -> our w1 / w2, w1 / w3 / w2.

Tying: transformers 5 always ties `lm_head` to `shared` unless a checkpoint holds a different
`lm_head.weight` (T5 v1.1), and scales the decoder output by d_model^-0.5 when config.json's
`scale_decoder_outputs` (else `tie_word_embeddings`) says so (v1.0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tformer.checkpoint import model_from_tensors
from tformer.config import ConfigError, ModelConfig
from tformer.convert.hf_dir import write_hf_dir
from tformer.io import CheckpointError, read_json, read_safetensors_dir
from tformer.models.encoder_decoder import EncoderDecoder

Rules = list[tuple[str, str | tuple[str, ...]]]

# feed_forward_proj -> our activation
_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gated-gelu": "geglu",
         "gated-gelu_new": "geglu", "gated-silu": "swiglu"}  # fmt: skip
_TO_HF_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu": "gated-gelu", "swiglu": "gated-silu"}


def _attn(stack: str, layer: int, module: str, parts: str) -> tuple[str, ...]:
    """HF names of one attention's projections `parts` (e.g. "qkv"), concatenated in ours."""
    return tuple(rf"{stack}.block.\1.layer.{layer}.{module}.{p}.weight" for p in parts)

_KEYS: Rules = [
    (r"tok_emb\.weight", "shared.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"enc_bias\.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"dec_bias\.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"enc_norm\.weight", "encoder.final_layer_norm.weight"),
    (r"dec_norm\.weight", "decoder.final_layer_norm.weight"),
    (r"enc_layers\.(\d+)\.attn_norm\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"enc_layers\.(\d+)\.attn\.wqkv\.weight", _attn("encoder", 0, "SelfAttention", "qkv")),
    (r"enc_layers\.(\d+)\.attn\.wo\.weight", r"encoder.block.\1.layer.0.SelfAttention.o.weight"),
    (r"enc_layers\.(\d+)\.ffn_norm\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"enc_layers\.(\d+)\.ffn\.(w\d)\.weight", r"encoder.block.\1.layer.1.DenseReluDense.{\2}.weight"),
    (r"dec_layers\.(\d+)\.attn_norm\.weight", r"decoder.block.\1.layer.0.layer_norm.weight"),
    (r"dec_layers\.(\d+)\.attn\.wqkv\.weight", _attn("decoder", 0, "SelfAttention", "qkv")),
    (r"dec_layers\.(\d+)\.attn\.wo\.weight", r"decoder.block.\1.layer.0.SelfAttention.o.weight"),
    (r"dec_layers\.(\d+)\.cross_norm\.weight", r"decoder.block.\1.layer.1.layer_norm.weight"),
    (r"dec_layers\.(\d+)\.cross\.wq\.weight", r"decoder.block.\1.layer.1.EncDecAttention.q.weight"),
    (r"dec_layers\.(\d+)\.cross\.wkv\.weight", _attn("decoder", 1, "EncDecAttention", "kv")),
    (r"dec_layers\.(\d+)\.cross\.wo\.weight", r"decoder.block.\1.layer.1.EncDecAttention.o.weight"),
    (r"dec_layers\.(\d+)\.ffn_norm\.weight", r"decoder.block.\1.layer.2.layer_norm.weight"),
    (r"dec_layers\.(\d+)\.ffn\.(w\d)\.weight", r"decoder.block.\1.layer.2.DenseReluDense.{\2}.weight"),
]  # fmt: skip
# our FFN weight -> HF's, plain (ReLU) and gated
_FFN = {False: {"w1": "wi", "w2": "wo"}, True: {"w1": "wi_0", "w3": "wi_1", "w2": "wo"}}
# copies of shared.weight, and a cross-attention bias HF never uses
_SKIP = re.compile(r"^(encoder|decoder)\.embed_tokens\.weight$|EncDecAttention\.relative_attention_bias")


def hf_names(rules: Rules, name: str, fill: dict[str, str] | None = None) -> list[str]:
    """The HF tensor names of our parameter `name` (several when ours concatenates them)."""
    for pattern, template in rules:
        if m := re.fullmatch(pattern, name):
            names = [m.expand(t) for t in (template if isinstance(template, tuple) else (template,))]
            return [n.format(**fill) if fill and "{" in n else n for n in names]
    raise RuntimeError(f"no HF name for parameter {name!r}: extend the key map")


def map_from_hf(model, rules: Rules, tensors: dict, source: str, skip: re.Pattern, fill=None) -> dict:
    """HF-named tensors -> our names for every parameter of `model` (on meta); CheckpointError
    naming missing or unexpected tensors. A tied output.weight is not read."""
    out, used, missing = {}, set(), []
    for name in model.state_dict():
        if name == "output.weight" and model.config.tie_embeddings:
            continue
        names = hf_names(rules, name, fill)
        missing += [n for n in names if n not in tensors]
        used.update(names)
        if all(n in tensors for n in names):
            out[name] = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
    unexpected = sorted(k for k in tensors if k not in used and not skip.search(k))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing tensors {missing[:8]}, "
                              f"unexpected tensors {unexpected[:8]}")  # fmt: skip
    return out


def map_to_hf(state: dict, rules: Rules, tied: bool, fill=None) -> dict:
    """Our state dict -> HF names; concatenated tensors split into equal parts (MHA only)."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and tied:
            continue
        names = hf_names(rules, name, fill)
        out.update(zip(names, t.chunk(len(names)) if len(names) > 1 else (t,)))
    return {k: v.contiguous() for k, v in out.items()}


def t5_config_from_hf(hf: dict[str, Any], untied_head: bool = False) -> ModelConfig:
    """A ModelConfig (architecture "encoder_decoder", positions "t5") from a T5 `config.json` dict;
    untied_head: the checkpoint holds an lm_head.weight of its own."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTS:
        raise ConfigError(f"t5: feed_forward_proj={proj!r} is not supported; supported values: {sorted(_ACTS)}")
    tied = hf.get("tie_word_embeddings", True) and not untied_head
    dropout = hf.get("dropout_rate", 0.1)
    return ModelConfig(
        architecture="encoder_decoder", vocab_size=hf["vocab_size"], dim=hf["d_model"], n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"],
        head_dim=hf["d_kv"], ffn_dim=hf["d_ff"], activation=_ACTS[proj], norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_placement="pre", positions="t5",
        rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), attn_scale=1.0,
        tie_embeddings=tied, scale_output=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)),
        max_seq_len=hf.get("n_positions", 512), emb_dropout=dropout, resid_dropout=dropout,
        init_std=hf.get("initializer_factor", 1.0) * 0.02, scale_residual_init=False,
    )  # fmt: skip


def t5_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for `T5ForConditionalGeneration`; ConfigError for what T5 cannot express."""
    wanted = dict(architecture="encoder_decoder", positions="t5", norm="rmsnorm", norm_placement="pre",
                  attn_scale=1.0, qkv_bias=False, out_bias=False, ffn_bias=False, n_kv_heads=cfg.n_heads)
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"T5 export needs {key}={value!r}, got {getattr(cfg, key)!r}")
    if cfg.activation not in _TO_HF_ACTS:
        raise ConfigError(f"T5 export: activation {cfg.activation!r} has no T5 feed_forward_proj")
    if cfg.scale_output != cfg.tie_embeddings:
        raise ConfigError("T5 export: transformers scales the decoder output exactly when the head is tied "
                          f"(v1.0); got tie_embeddings={cfg.tie_embeddings}, scale_output={cfg.scale_output}")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_dim, "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.rel_buckets, "relative_attention_max_distance": cfg.rel_max_distance,
        "dropout_rate": cfg.resid_dropout, "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": _TO_HF_ACTS[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }  # fmt: skip


def load_hf_t5(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> EncoderDecoder:
    """An EncoderDecoder from an HF T5ForConditionalGeneration directory (config.json + safetensors)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    tensors = read_safetensors_dir(path)
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    untied = head is not None and (shared is None or not torch.equal(head, shared))
    try:
        cfg = t5_config_from_hf(hf, untied)
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    skip = _SKIP if untied else re.compile(_SKIP.pattern + r"|^lm_head\.weight$")
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    ours = map_from_hf(model, _KEYS, tensors, str(path), skip, _FFN[cfg.gated])
    return model_from_tensors(cfg, ours, str(path), device, dtype)


def t5_state_dict_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF T5 names (a tied head is not written: transformers ties it)."""
    return map_to_hf(state, _KEYS, cfg.tie_embeddings, _FFN[cfg.gated])


def save_hf_t5(model: EncoderDecoder, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` as an HF directory that `T5ForConditionalGeneration.from_pretrained` loads
    (tokenizer: as write_seq2seq_dir; without one T5's ids: pad 0, eos 1)."""
    hf = t5_config_to_hf(model.config)  # fails before anything is written
    tensors = t5_state_dict_to_hf(model.state_dict(), model.config)
    return write_seq2seq_dir(model, path, unshared(tensors), hf, tokenizer, max_shard_bytes)


def write_seq2seq_dir(model, path: str | Path, tensors: dict, hf: dict, tokenizer=None,
                      max_shard_bytes: int | None = None) -> Path:
    """An encoder-decoder's HF directory. With `tokenizer` (a Tokenizer or a path) its files go along,
    and config.json and generation_config.json take its ids: pad (also the decoder's start, as tformer
    decodes) and eos; without one, `hf`'s ids stay and a warning says the export has no tokenizer."""
    from tformer.checkpoint import tokenizer_for, warn_no_tokenizer

    tokenizer = tokenizer_for(model, tokenizer)
    extra = {}
    if tokenizer is None:
        warn_no_tokenizer(Path(path), "save_hf", needs="`AutoTokenizer` (and `tformer generate`)")
    else:
        if tokenizer.pad_id is None or tokenizer.eos_id is None:
            raise ValueError("the tokenizer needs a pad token (the decoder's start) and an end token for an "
                             "encoder-decoder export")
        ids = {"pad_token_id": tokenizer.pad_id, "decoder_start_token_id": tokenizer.pad_id,
               "eos_token_id": tokenizer.eos_id}
        hf = {**hf, **ids, **({"forced_eos_token_id": tokenizer.eos_id} if "forced_eos_token_id" in hf else {})}
        extra["generation_config.json"] = dict(ids)
    return write_hf_dir(path, tensors, hf, tokenizer, max_shard_bytes, extra)


def unshared(tensors: dict) -> dict:
    """Tensors with shared storage copied apart, as safetensors requires (a tied T5 / Marian head)."""
    return {k: v.detach().clone() for k, v in tensors.items()}
