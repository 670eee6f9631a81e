"""A base checkpoint and an adapter directory -> one plain model: in memory for decoding
(`load_merged`), or on disk as an ordinary tformer checkpoint (`merge_checkpoint`).

The base is read at its stored precision, so the adapter's base fingerprint is checked on the
weights it was trained on; the merge happens there (in float32 arithmetic, `merge_lora`) and only
the merged model is cast to the requested dtype. A QLoRA adapter quantizes the base to NF4 first,
as in training, so the merged model computes what the adapted model did.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.adapters.io import load_adapter
from tformer.adapters.lora import MergeReport, merge_lora

PROBE_TOKENS = 32  # length of the probe that compares merged and adapted logits


def load_merged(checkpoint: str | Path, adapter: str | Path, device="cpu", dtype: torch.dtype | None = None,
                probe_tokens: int = 0):
    """(model, MergeReport): `checkpoint`'s model with the adapter at `adapter` folded into its weights,
    on `device`, cast to `dtype` (default: as stored), in eval mode. AdapterError when the adapter
    does not fit the base. With probe_tokens > 0, report.max_logit_diff compares the returned
    model's logits with the adapted model's on that many fixed pseudo-random tokens."""
    from tformer.checkpoint import load

    model = load_adapter(load(checkpoint, device=device), adapter)
    probe = _probe(model.config, probe_tokens, device) if probe_tokens > 0 else None
    with torch.no_grad():
        before = model(probe) if probe is not None else None
        report = merge_lora(model, dtype=dtype)
        model.to(dtype=dtype).eval()
        if probe is not None:
            report.max_logit_diff = (model(probe).float() - before.float()).abs().max().item()
    return model, report


def merge_checkpoint(checkpoint: str | Path, adapter: str | Path, out: str | Path,
                     dtype: torch.dtype | None = None, probe_tokens: int = PROBE_TOKENS) -> MergeReport:
    """Write base + adapter as a plain tformer checkpoint at `out` (atomically), with the base's
    tokenizer and the chat template of `chat_template_folder`; returns the MergeReport (logits
    compared on a probe of `probe_tokens` tokens)."""
    from tformer.checkpoint import save
    from tformer.convert.gguf import read_chat_template, write_chat_template
    from tformer.tokenizer import TOKENIZER_FILE

    checkpoint = Path(checkpoint)
    model, report = load_merged(checkpoint, adapter, dtype=dtype, probe_tokens=probe_tokens)
    tokenizer = checkpoint if (checkpoint / TOKENIZER_FILE).is_file() else None
    template = read_chat_template(chat_template_folder(checkpoint, adapter))
    save(model, out, tokenizer=tokenizer, write_extra=lambda folder: write_chat_template(folder, template))
    return report


def chat_template_folder(checkpoint: str | Path, adapter: str | Path | None = None) -> Path:
    """The folder whose chat template base + adapter answers in: the adapter's directory when it
    holds one (a fine-tuning run saves the template it trained with), else the base checkpoint."""
    from tformer.convert.gguf import read_chat_template

    if adapter is not None and Path(adapter).is_dir() and read_chat_template(adapter) is not None:
        return Path(adapter)
    return Path(checkpoint)


def _probe(config, n: int, device) -> torch.Tensor:
    """(1, n) token ids (n capped at max_seq_len), the same for every call."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, min(n, config.max_seq_len)), generator=generator).to(device)
