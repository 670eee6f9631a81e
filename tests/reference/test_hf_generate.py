"""Greedy generation equals HF transformers' greedy `generate` on the same HF directory."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.inference import SamplingConfig, generate  # noqa: E402
from tests.reference.test_hf_parity import LLAMA, hf_model  # noqa: E402

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_greedy_equals_hf_generate(tmp_path, family):
    hf = hf_model(FAMILIES[family]())
    hf.save_pretrained(tmp_path)
    ours = tformer.load(tmp_path).eval()
    prompts = [[5, 9, 14, 3, 22, 7], [31, 2, 8]]
    tokens = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, 6 - len(p):], mask[i, 6 - len(p):] = torch.tensor(p), 1
    expected = hf.generate(
        input_ids=tokens, attention_mask=mask, max_new_tokens=12, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )[:, 6:]
    got = generate(ours, prompts, max_new_tokens=12, sampling=SamplingConfig(temperature=0))
    assert got == expected.tolist()
