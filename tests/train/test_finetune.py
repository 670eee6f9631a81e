"""Fine-tuning through the one loop: loss masking, packing, LoRA checkpoints and resume, DPO."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import tformer
from tformer.adapters import load_adapter
from tformer.chat import ChatTemplate
from tformer.data.sft import IGNORE, ExampleSplit, collate, encode_chat, encode_completion
from tformer.models import build_model
from tformer.tokenizer import Tokenizer
from tformer.train.config import TrainConfig
from tformer.train.evaluate import evaluate_objective
from tformer.train.loop import train
from tformer.train.state import checkpoint_dirs
from tformer.train.objectives import DPO, NextToken, dpo_loss, sequence_logps
from tests.conftest import tiny_config

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama-shaped checkpoint with a 320-token BPE tokenizer (ChatML markers special)."""
    path = tmp_path_factory.mktemp("base") / "ckpt"
    text = " ".join(WORDS * 30)
    tok = Tokenizer.train_bpe([text], vocab_size=320,
                              special_tokens=("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    model = build_model(tiny_config(vocab_size=320, max_seq_len=128))
    tformer.save(model, path, tokenizer=tok)
    return path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        out.append({"messages": [{"role": "user", "content": f"say {a}"}, {"role": "assistant", "content": f"{a} {b}"}]})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_loss_is_on_assistant_turns_only(base):
    tok = Tokenizer.load(base)
    template = ChatTemplate(None)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat on a mat"}, {"role": "user", "content": "and"},
                {"role": "assistant", "content": "the dog"}]
    ex = encode_chat(messages, template, tok)
    trained = tok.decode(ex.ids[ex.trained].tolist())
    assert trained == "sat on a mat<|im_end|>\nthe dog<|im_end|>\n"
    assert tok.decode(ex.ids.tolist()) == template.render(messages)
    assert encode_chat(messages, template, tok, train_on_prompt=True).trained.all()


def test_completion_loss_is_on_completion_and_eos(base):
    tok = Tokenizer.load(base)
    ex = encode_completion("the cat", " sat on a mat", tok)
    assert tok.decode(ex.ids[ex.trained].tolist()) == " sat on a mat<|eos|>"
    assert ex.ids.tolist()[:2] == tok.encode("the cat") and not ex.trained[:2].any()  # no bos: its BPE adds none


def test_targets_mark_only_trained_tokens(base):
    tok = Tokenizer.load(base)
    ex = encode_completion("the cat", " sat", tok)
    batch = collate([ex], [[0]], 16, packing=False)
    kept = batch["targets"][0] != IGNORE
    assert batch["targets"][0][kept].tolist() == ex.ids[1:][ex.trained[1:]].tolist()
    assert batch["n_targets"] == ex.n_trained


def test_packed_loss_equals_unpacked_loss(base):
    """The same examples packed into rows (attention inside each) or one a row give one loss."""
    tok = Tokenizer.load(base)
    template = ChatTemplate(None)
    examples = [encode_chat(r["messages"], template, tok) for r in chat_records(12)]
    model = tformer.load(base)
    objective = NextToken(model)
    packed = evaluate_objective(model, objective, ExampleSplit(examples, 64, True, 0).eval_batches(2))
    unpacked = evaluate_objective(model, objective, ExampleSplit(examples, 64, False, 0).eval_batches(5))
    rows = list(ExampleSplit(examples, 64, True, 0).eval_batches(100))[0]["tokens"].shape[0]
    assert rows < len(examples)  # several examples did share a row
    assert packed["val_tokens"] == unpacked["val_tokens"]
    assert packed["val_loss"] == pytest.approx(unpacked["val_loss"], rel=1e-5)


def test_training_batches_depend_only_on_seed_and_index(base):
    tok = Tokenizer.load(base)
    examples = [encode_chat(r["messages"], ChatTemplate(None), tok) for r in chat_records(20)]
    a, b = ExampleSplit(examples, 64, True, 5), ExampleSplit(examples, 64, True, 5)
    for index in (0, 7, 3, 40):  # past the first epoch too
        assert torch.equal(a.batch(index, 2)["tokens"], b.batch(index, 2)["tokens"])


def run_config(base, tmp_path, data, **overrides) -> TrainConfig:
    cfg = dict(preset=str(base), data=[str(data)], batch_size=4, seq_len=64, max_steps=6, warmup=1, lr=1e-2,
               eval_every=3, eval_batches=0, log_every=1, out_dir=str(tmp_path / "run"), tensorboard=False,
               sample_tokens=0, val_fraction=0.2, seed=1)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def test_lora_sft_saves_adapters_that_load_on_the_base(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(30))
    result = train(run_config(base, tmp_path, data, method="lora", lora={"r": 4, "targets": ["all-linear"]}),
                   progress=False)
    best = tmp_path / "run" / "best"
    assert (best / "adapter_config.json").is_file() and not (best / "model.safetensors").exists()
    assert (best / "tokenizer.json").is_file()
    assert "im_start" in json.loads((best / "tokenizer_config.json").read_text())["chat_template"]
    before = tformer.load(base)
    adapted = load_adapter(tformer.load(base), best)
    x = torch.randint(320, (1, 10))
    assert not torch.allclose(before(x), adapted(x))  # the adapters learned something
    assert math.isfinite(result.val_loss) and result.val_bpc is None


def test_lora_run_resumes_exactly(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(30))
    cfg = run_config(base, tmp_path, data, method="lora", lora={"r": 4}, keep_last=5, dropout=0.1)
    whole = train(cfg, progress=False)
    full = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for ckpt in checkpoint_dirs(cfg.out_dir):  # interrupted after step 3
        if ckpt.name != "step-000003":
            shutil.rmtree(ckpt)
    cfg.resume = True
    resumed = train(cfg, progress=False)
    again = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in again] == [r.get("loss") for r in full]
    assert resumed.val_loss == whole.val_loss


def test_full_sft_keeps_the_chat_template(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    train(run_config(base, tmp_path, data, max_steps=2, eval_every=2), progress=False)
    best = tmp_path / "run" / "best"
    assert ChatTemplate.for_checkpoint(best).source == ChatTemplate(None).source
    tformer.load(best)


def test_dpo_loss_matches_its_formula():
    pc, pr = torch.tensor([-4.0, -7.0]), torch.tensor([-6.0, -5.0])
    rc, rr = torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -5.5])
    beta = 0.5
    # pair 1: margin (1) - (-0.5) = 1.5; pair 2: (-1) - (0.5) = -1.5
    expected = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.75)))) / 2
    assert dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_sum_over_trained_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, IGNORE, 3, IGNORE], [IGNORE] * 4 + [6]])
    logp = F.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 3, 3], logp[1, 4, 6]])
    torch.testing.assert_close(sequence_logps(logits, targets), expected)


def preference_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a = WORDS[i % len(WORDS)]
        out.append({"prompt": f"the {a}", "chosen": " sat on a mat", "rejected": " ran to the park"})
    return out


@pytest.mark.parametrize("method,reference", [("lora", "model"), ("full", "precomputed")])
def test_dpo_raises_the_chosen_margin(base, tmp_path, method, reference):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_records(24))
    cfg = run_config(base, tmp_path, data, method=method, dpo_reference=reference, max_steps=8, eval_every=100,
                     dpo_beta=0.5, lr=5e-3 if method == "full" else 2e-2,
                     **({"lora": {"r": 4, "targets": ["all-linear"]}} if method == "lora" else {}))
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert final["val_reward_margin"] > 0 and final["val_reward_accuracy"] > 0.5
    assert final["val_pairs"] == 5
    first = [r for r in rows if r["kind"] == "train"][0]
    assert first["reward_margin"] == pytest.approx(0, abs=1e-4)  # policy = reference at the start
    assert isinstance(DPO, type)


def test_finetune_command_trains_lora_and_inspect_marks_the_loss(base, tmp_path, capsys):
    from tformer.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    assert main(["data", "inspect", str(data), "--ckpt", str(base), "--index", "1", "--marks", "plain"]) == 0
    shown = capsys.readouterr().out
    answer = chat_records(20)[1]["messages"][1]["content"]
    assert f"[[{answer}<|im_end|>\n]]" in shown and "20 examples" in shown
    out = tmp_path / "ft"
    code = main(["finetune", str(base), "--data", str(data), "--max-steps", "2", "--eval-every", "2",
                 "--out-dir", str(out), "--lora.r", "2", "--lora.targets", "wqkv", "--no-tensorboard", "--device", "cpu"])
    assert code == 0
    meta = json.loads((out / "best" / "adapter_config.json").read_text())
    assert meta["lora"]["r"] == 2 and all(t.endswith("wqkv") for t in meta["lora"]["targets"])
    assert f"tformer chat {base} --adapter {out / 'best'}" in capsys.readouterr().out


def test_finetune_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    from tformer.cli import main

    assert main(["finetune", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "not a tformer checkpoint" in capsys.readouterr().err


def test_qlora_run_trains_adapters_on_an_nf4_base(tmp_path, monkeypatch):
    from tformer.adapters import NF4Linear

    path = tmp_path / "base64"
    text = " ".join(WORDS * 30)
    tok = Tokenizer.train_bpe([text], vocab_size=320,
                              special_tokens=("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    tformer.save(build_model(tiny_config(vocab_size=320, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                          max_seq_len=128)), path, tokenizer=tok)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    cfg = run_config(path, tmp_path, data, method="qlora", lora={"r": 4, "targets": ["all-linear"]}, max_steps=2,
                     eval_every=2)
    seen = {}
    import tformer.train.loop as loop

    make = loop.make_objective

    def spy(cfg, model, data, teacher=None):
        seen["nf4"] = sum(isinstance(m, NF4Linear) for m in model.modules())
        return make(cfg, model, data, teacher)

    monkeypatch.setattr(loop, "make_objective", spy)
    train(cfg, progress=False)
    assert seen["nf4"] == 2 * 5  # wqkv, wo, w1, w2, w3 of both blocks train on NF4 weights
    meta = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert meta["lora"]["quantize"] == "nf4"
    adapted = load_adapter(tformer.load(path), tmp_path / "run" / "best")
    assert sum(isinstance(m, NF4Linear) for m in adapted.modules()) == seen["nf4"]
