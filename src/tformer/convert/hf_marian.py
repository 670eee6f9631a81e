"""HF `MarianMTModel` checkpoints <-> tformer `EncoderDecoder`: the original Transformer's shape.

Marian is post-norm LayerNorm, sinusoidal positions from 0, embeddings times sqrt(d_model)
(`scale_embedding`), biases everywhere, one embedding shared by source, target and (tied) output.
Its quirks, and what the converter does with them:

    sinusoids laid out [sin | cos] by halves, not interleaved  -> `sinusoid_split=True`
    positions are not stored (computed, `_keys_to_ignore_on_save`) -> nothing to read
    `final_logits_bias` (1, vocab), a buffer, zero in every release -> read only if all zero; written as zeros
    separate `decoder_vocab_size` (share_encoder_decoder_embeddings=False) -> refused
    no bias in a tformer layer (qkv_bias=False, ...)          -> exported as zero biases, which Marian adds

Self-attention q | k | v concatenate into our wqkv rows (and biases), cross-attention k | v into wkv.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tformer.checkpoint import model_from_tensors
from tformer.config import ConfigError, ModelConfig
from tformer.convert.hf_t5 import Rules, hf_names, map_from_hf, map_to_hf, save_hf_t5, unshared, write_seq2seq_dir
from tformer.io import CheckpointError, read_json, read_safetensors_dir
from tformer.models.encoder_decoder import EncoderDecoder

_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "swish": "silu", "silu": "silu"}
_TO_HF_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "swish"}


def _layer_keys(ours: str, hf: str) -> Rules:
    """One stack's layer rules: ours `enc_layers` / `dec_layers`, HF `model.encoder` / `model.decoder`."""
    qkv = tuple(rf"{hf}.layers.\1.self_attn.{p}_proj.\2" for p in "qkv")
    kv = tuple(rf"{hf}.layers.\1.encoder_attn.{p}_proj.\2" for p in "kv")
    return [
        (rf"{ours}\.(\d+)\.attn\.wqkv\.(weight|bias)", qkv),
        (rf"{ours}\.(\d+)\.attn\.wo\.(weight|bias)", rf"{hf}.layers.\1.self_attn.out_proj.\2"),
        (rf"{ours}\.(\d+)\.attn_norm\.(weight|bias)", rf"{hf}.layers.\1.self_attn_layer_norm.\2"),
        (rf"{ours}\.(\d+)\.cross\.wq\.(weight|bias)", rf"{hf}.layers.\1.encoder_attn.q_proj.\2"),
        (rf"{ours}\.(\d+)\.cross\.wkv\.(weight|bias)", kv),
        (rf"{ours}\.(\d+)\.cross\.wo\.(weight|bias)", rf"{hf}.layers.\1.encoder_attn.out_proj.\2"),
        (rf"{ours}\.(\d+)\.cross_norm\.(weight|bias)", rf"{hf}.layers.\1.encoder_attn_layer_norm.\2"),
        (rf"{ours}\.(\d+)\.ffn\.w1\.(weight|bias)", rf"{hf}.layers.\1.fc1.\2"),
        (rf"{ours}\.(\d+)\.ffn\.w2\.(weight|bias)", rf"{hf}.layers.\1.fc2.\2"),
        (rf"{ours}\.(\d+)\.ffn_norm\.(weight|bias)", rf"{hf}.layers.\1.final_layer_norm.\2"),
    ]  # fmt: skip


_KEYS: Rules = [
    (r"tok_emb\.weight", "model.shared.weight"),
    (r"output\.weight", "lm_head.weight"),
    *_layer_keys("enc_layers", "model.encoder"),
    *_layer_keys("dec_layers", "model.decoder"),
]
# copies of the shared embedding, computed positions, and the (all-zero) logits bias, checked apart
_SKIP = re.compile(r"^model\.(encoder|decoder)\.(embed_tokens|embed_positions)\.weight$|^final_logits_bias$")


def marian_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig (architecture "encoder_decoder", post-norm, split sinusoids) from a Marian `config.json`."""
    if not hf.get("share_encoder_decoder_embeddings", True) or hf.get("decoder_vocab_size") not in (
            None, hf["vocab_size"]):  # fmt: skip
        raise ConfigError("marian: separate source and target vocabularies are not supported "
                          "(share_encoder_decoder_embeddings must be true)")
    for ours, (enc, dec) in {"heads": ("encoder_attention_heads", "decoder_attention_heads"),
                             "ffn sizes": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():  # fmt: skip
        if hf[enc] != hf[dec]:
            raise ConfigError(f"marian: encoder and decoder {ours} differ ({enc}={hf[enc]}, {dec}={hf[dec]}); "
                              "tformer's stacks share them")
    act = hf.get("activation_function", "gelu")
    if act not in _ACTS:
        raise ConfigError(f"marian: activation_function={act!r} is not supported; supported: {sorted(_ACTS)}")
    return ModelConfig(
        architecture="encoder_decoder", vocab_size=hf["vocab_size"], dim=hf["d_model"],
        n_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"], n_heads=hf["encoder_attention_heads"],
        ffn_dim=hf["encoder_ffn_dim"], activation=_ACTS[act], norm="layernorm", norm_eps=1e-5,
        norm_placement="post", positions="sinusoidal", sinusoid_split=True,
        scale_embeddings=hf.get("scale_embedding", False), qkv_bias=True, out_bias=True, ffn_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), max_seq_len=hf.get("max_position_embeddings", 1024),
        emb_dropout=hf.get("dropout", 0.1), attn_dropout=hf.get("attention_dropout", 0.0),
        resid_dropout=hf.get("dropout", 0.1), init_std=hf.get("init_std", 0.02), scale_residual_init=False,
    )  # fmt: skip


def marian_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for `MarianMTModel`; ConfigError for what Marian cannot express."""
    wanted = dict(architecture="encoder_decoder", positions="sinusoidal", sinusoid_split=True, norm="layernorm",
                  norm_placement="post", attn_scale=None, scale_output=False, n_kv_heads=cfg.n_heads,
                  head_dim=cfg.dim // cfg.n_heads, norm_eps=1e-5)  # fmt: skip
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"Marian export needs {key}={value!r}, got {getattr(cfg, key)!r}")
    if cfg.activation not in _TO_HF_ACTS:
        raise ConfigError(f"Marian export: activation {cfg.activation!r} has no Marian activation_function")
    V = cfg.vocab_size
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": V, "decoder_vocab_size": V,
        "d_model": cfg.dim, "encoder_layers": cfg.n_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "activation_function": _TO_HF_ACTS[cfg.activation], "scale_embedding": cfg.scale_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "dropout": cfg.resid_dropout,
        "attention_dropout": cfg.attn_dropout, "init_std": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "share_encoder_decoder_embeddings": True, "is_encoder_decoder": True,
        "pad_token_id": V - 1, "decoder_start_token_id": V - 1, "eos_token_id": 0, "forced_eos_token_id": 0,
    }  # fmt: skip


def load_hf_marian(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> EncoderDecoder:
    """An EncoderDecoder from an HF MarianMTModel directory (config.json + safetensors)."""
    path = Path(path)
    try:
        cfg = marian_config_from_hf(read_json(path / "config.json"))
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    tensors = read_safetensors_dir(path)
    bias = tensors.get("final_logits_bias")
    if bias is not None and bias.any():
        raise CheckpointError(f"{path}: final_logits_bias is not all zero; tformer's output head has no bias")
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the shared embedding, again
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    ours = map_from_hf(model, _KEYS, tensors, str(path), _SKIP)
    return model_from_tensors(cfg, ours, str(path), device, dtype)


def marian_state_dict_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Marian names; biases tformer does not have are written as zeros."""
    out = map_to_hf(state, _KEYS, cfg.tie_embeddings)
    for name, t in state.items():
        in_layer = re.search(r"\.(attn|cross|ffn)\.|_norm\.", name)  # a layer's Linear or LayerNorm
        if in_layer and name.endswith(".weight") and name[:-6] + "bias" not in state:
            for hf_weight in hf_names(_KEYS, name):
                rows = out[hf_weight].shape[0]
                out[hf_weight[:-6] + "bias"] = torch.zeros(rows, dtype=t.dtype)
    out["final_logits_bias"] = torch.zeros(1, cfg.vocab_size, dtype=state["tok_emb.weight"].dtype)
    return out


def save_hf_marian(model: EncoderDecoder, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` as an HF directory that `MarianMTModel.from_pretrained` loads (tokenizer: as
    hf_t5.write_seq2seq_dir; without one Marian's ids: pad vocab_size - 1, eos 0)."""
    hf = marian_config_to_hf(model.config)  # fails before anything is written
    tensors = unshared(marian_state_dict_to_hf(model.state_dict(), model.config))
    return write_seq2seq_dir(model, path, tensors, hf, tokenizer, max_shard_bytes)


def save_hf_encoder_decoder(model: EncoderDecoder, path: str | Path, tokenizer=None,
                            max_shard_bytes: int | None = None) -> Path:
    """`save_hf` for an EncoderDecoder: T5ForConditionalGeneration for relative position bias, else
    MarianMTModel."""
    save = save_hf_t5 if model.config.positions == "t5" else save_hf_marian
    return save(model, path, tokenizer, max_shard_bytes)
