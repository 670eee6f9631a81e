"""A sample from a finished run's best checkpoint, printed after `tformer train`."""

from __future__ import annotations

from pathlib import Path

from tformer.adapters import load_merged
from tformer.adapters.io import CONFIG_FILE as ADAPTER_FILE
from tformer.checkpoint import load
from tformer.inference import SamplingConfig, generate_text, load_tokenizer
from tformer.train.loop import resolve_device
from tformer.train.state import checkpoint_dirs


def print_sample(cfg) -> str:
    best = Path(cfg.out_dir) / "best"
    path = best if best.is_dir() else checkpoint_dirs(cfg.out_dir)[-1]
    if (path / ADAPTER_FILE).is_file():  # a LoRA run: its adapters on the base it trained
        model, _ = load_merged(cfg.preset, path, device=resolve_device(cfg.device))
    else:
        model = load(path, device=resolve_device(cfg.device)).eval()
    tokenizer = load_tokenizer(path)
    prompt = cfg.sample_prompt or "\n"
    n = min(cfg.sample_tokens, model.config.max_seq_len - len(tokenizer.encode(prompt)))
    print(f"\n--- sample from {path} ---\n{prompt}", end="")
    text = generate_text(model, tokenizer, [prompt], n, SamplingConfig(temperature=0.8, top_k=200),
                         seed=cfg.seed, stream=True)[0]
    print()
    return text
