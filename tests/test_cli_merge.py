"""`tformer merge CKPT ADAPTER OUT` and `--adapter DIR` on generate and chat, on a tiny random model:
the merged checkpoint computes the adapted model's logits and keeps the tokenizer and chat template;
decoding with --adapter equals decoding the merged checkpoint; an adapter trained on another base,
a missing adapter and an existing OUT are refused in one line. In-process (`tformer.cli.main`)."""

import pytest
import torch

import tformer
from tests.test_cli_chat import GREEDY, TEMPLATE, chat_checkpoint, one_line_error
from tformer.adapters import LoRAConfig, apply_lora, lora_parameters, save_adapter
from tformer.cli import main
from tformer.convert.gguf import read_chat_template, write_chat_template
from tformer.tokenizer import Tokenizer

TOKENS = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def adapted(tmp_path):
    """(base checkpoint, adapter directory, the adapted model's logits on TOKENS)."""
    base = chat_checkpoint(tmp_path / "base")
    model = apply_lora(tformer.load(base), LoRAConfig(r=4, alpha=8, targets=["all-linear", "output"]))
    torch.manual_seed(123)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.05)  # B nonzero: the adapter changes the model
        logits = model(TOKENS)
    save_adapter(model, tmp_path / "adapter", base=base)
    return base, tmp_path / "adapter", logits


def cli(*args, capsys) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merged_checkpoint_is_the_adapted_model_with_tokenizer_and_template(adapted, tmp_path, capsys):
    base, adapter, logits = adapted
    code, out, _ = cli("merge", base, adapter, tmp_path / "merged", capsys=capsys)
    assert code == 0 and "merged 11 LoRA layers" in out
    change = float(out.split("max weight change ")[1].split(";")[0])
    diff = float(out.split("max logit difference from the adapted model ")[1].split(" ")[0])
    assert change > 1e-3 and diff < 1e-5  # the adapter mattered; the merge kept its logits
    merged = tformer.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), logits, rtol=1e-5, atol=1e-5)
        assert (merged(TOKENS) - tformer.load(base)(TOKENS)).abs().max() > 1e-2
    assert read_chat_template(tmp_path / "merged") == TEMPLATE
    assert Tokenizer.load(tmp_path / "merged").to_str() == Tokenizer.load(base).to_str()

    # --adapter decodes as the merged checkpoint does
    for command, text in (("chat", "--message"), ("generate", "--prompt")):
        _, from_merged, _ = cli(command, tmp_path / "merged", text, "Hi.", *GREEDY, capsys=capsys)
        code, with_adapter, _ = cli(command, base, "--adapter", adapter, text, "Hi.", *GREEDY, capsys=capsys)
        assert code == 0 and with_adapter == from_merged and len(from_merged) > 2

    code, _, _ = cli("merge", base, adapter, tmp_path / "bf16", "--dtype", "bfloat16", capsys=capsys)
    assert code == 0 and tformer.load(tmp_path / "bf16").output.weight.dtype == torch.bfloat16


def test_the_adapters_own_chat_template_wins(adapted, tmp_path, capsys):
    base, adapter, _ = adapted
    _, in_base_template, _ = cli("chat", base, "--adapter", adapter, "--message", "Hi.", *GREEDY, capsys=capsys)
    own = TEMPLATE.replace("assistant\n{% endif %}", "assistant\nA: {% endif %}")  # replies start after "A: "
    write_chat_template(adapter, own)  # as a fine-tuning run saves the template it trained with
    assert cli("merge", base, adapter, tmp_path / "merged", capsys=capsys)[0] == 0
    assert read_chat_template(tmp_path / "merged") == own
    _, from_merged, _ = cli("chat", tmp_path / "merged", "--message", "Hi.", *GREEDY, capsys=capsys)
    _, in_own_template, _ = cli("chat", base, "--adapter", adapter, "--message", "Hi.", *GREEDY, capsys=capsys)
    assert in_own_template == from_merged != in_base_template


def test_merge_and_adapter_refusals(adapted, tmp_path, capsys):
    base, adapter, _ = adapted
    other = chat_checkpoint(tmp_path / "other", seed=1)
    err = one_line_error(*cli("merge", other, adapter, tmp_path / "out", capsys=capsys)[::2])
    assert "trained on another base" in err and not (tmp_path / "out").exists()
    for command, text in (("chat", "--message"), ("generate", "--prompt")):
        err = one_line_error(*cli(command, other, "--adapter", adapter, text, "Hi.", capsys=capsys)[::2])
        assert f"tformer {command}: error:" in err and "trained on another base" in err
    wider = chat_checkpoint(tmp_path / "wider", dim=96)
    err = one_line_error(*cli("chat", wider, "--adapter", adapter, "--message", "Hi.", capsys=capsys)[::2])
    assert "a base of another shape" in err
    err = one_line_error(*cli("merge", base, tmp_path / "nowhere", tmp_path / "out", capsys=capsys)[::2])
    assert "not a tformer adapter directory" in err

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = one_line_error(*cli("merge", base, adapter, tmp_path / "out", capsys=capsys)[::2])
    assert "--overwrite" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert cli("merge", base, adapter, tmp_path / "out", "--overwrite", capsys=capsys)[0] == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
