"""`tformer chat` and tformer.inference.chat on a tiny random model with a character tokenizer: each
reply is the greedy continuation of the whole conversation as the checkpoint's template renders it;
the end-of-turn marker stops a reply; /reset, /system and --system; the oldest exchanges give way
when the context is full, and a message that cannot fit is refused; stdin lines until EOF or /exit.
The command runs in-process (`tformer.cli.main`): an exception escaping it fails the test."""

import io

import pytest
import torch

import tformer
from tests.conftest import tiny_config
from tformer.chat import ChatTemplate
from tformer.cli import main
from tformer.convert.gguf import write_chat_template
from tformer.inference import SamplingConfig, generate_text
from tformer.inference.chat import ChatError, ChatSession, end_of_turn
from tformer.tokenizer import Tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:?!'\n"
# id 0 is the end-of-turn marker; the eos is another token (Llama 3's and Gemma's vocabularies are so)
SPECIALS = ("<|im_end|>", "<|im_start|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
# ChatML with a "Q:" before user messages: a reply from plain ChatML would differ
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'user' %}Q: {% endif %}"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


def chat_checkpoint(path, seed: int = 0, template: str | None = TEMPLATE, **changes):
    """A tiny random model (max_seq_len 128) with a character tokenizer and `template` saved at `path`."""
    changes.setdefault("max_seq_len", 128)
    tokenizer = Tokenizer.train_char(CHARS, special_tokens=SPECIALS)
    torch.manual_seed(seed)
    model = tformer.build_model(tiny_config(vocab_size=tokenizer.vocab_size, **changes))
    tformer.save(model, path, tokenizer=tokenizer, write_extra=lambda folder: write_chat_template(folder, template))
    return path


def chat(*args, capsys) -> tuple[int, str, str]:
    code = main(["chat", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def ckpt(tmp_path):
    return chat_checkpoint(tmp_path / "ckpt")


def test_each_reply_continues_the_conversation_in_the_checkpoints_template(ckpt, capsys):
    code, out, _ = chat(ckpt, "--message", "Hi there.", "--message", "And you?", *GREEDY, capsys=capsys)
    assert code == 0
    model, tok = tformer.load(ckpt), Tokenizer.load(ckpt)
    template = ChatTemplate(TEMPLATE, eos_token="<|eos|>")
    stop = ["<|eos|>", "<|im_end|>"]

    def greedy(messages):
        ids = tok.encode(template.render(messages, add_generation_prompt=True))
        return generate_text(model, tok, [ids], 6, SamplingConfig(temperature=0), stop)[0]

    first = greedy([{"role": "user", "content": "Hi there."}])
    second = greedy([{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "And you?"}])
    assert out == f"{first}\n{second}\n"


def test_a_reply_ends_at_the_templates_end_of_turn_marker(ckpt):
    model, tok = tformer.load(ckpt), Tokenizer.load(ckpt)
    template = ChatTemplate.for_checkpoint(ckpt, tok)
    assert end_of_turn(template) == "<|im_end|>" != tok.id_to_token(tok.eos_id)
    with torch.no_grad():
        model.norm.weight.zero_()  # every logit 0: greedy picks id 0, the end-of-turn marker
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    session = ChatSession(model, tok, template, max_new_tokens=20, sampling=SamplingConfig(temperature=0))
    assert session.reply("Hi.") == ""
    assert len(calls) == 1  # the prompt's forward only: no decode step after the marker
    assert session.turns[-1] == {"role": "assistant", "content": ""}


def test_reset_and_system_commands(ckpt, capsys):
    code, out, err = chat(ckpt, "--message", "Hi.", "--message", "/reset", "--message", "Hi.", *GREEDY,
                          capsys=capsys)
    assert code == 0 and "conversation cleared" in err
    first, second = out.split("\n")[:2] if out.count("\n") == 2 else (None, None)
    assert first is not None and first == second, out  # after /reset the same question, the same answer

    _, with_flag, _ = chat(ckpt, "--system", "Be brief.", "--message", "Hi.", *GREEDY, capsys=capsys)
    code, with_command, err = chat(ckpt, "--message", "Hi.", "--message", "/system Be brief.", "--message", "Hi.",
                                   *GREEDY, capsys=capsys)
    assert code == 0 and "system prompt set" in err
    assert with_command.endswith(with_flag)  # /system TEXT then Hi. answers as --system TEXT does

    err = one_line_error(*chat(ckpt, "--message", "/nope", capsys=capsys)[::2])
    assert "unknown command /nope" in err and "/reset" in err


def test_oldest_exchanges_give_way_and_the_system_prompt_stays(ckpt, capsys):
    notes, tok = [], Tokenizer.load(ckpt)
    dialog = ChatSession(tformer.load(ckpt), tok, ChatTemplate(TEMPLATE), system="Be brief.",
                          max_new_tokens=40, sampling=SamplingConfig(temperature=0), on_note=notes.append)
    for question in ["Hi.", "Who are you?", "Why?", "Really?"]:
        dialog.reply(question)
        assert len(dialog.prompt_ids(dialog.turns[:-1])) + 40 <= 128
    assert notes and "dropped the oldest" in notes[0] and "system prompt stays" in notes[0]
    assert dialog.messages()[0] == {"role": "system", "content": "Be brief."}
    assert tok.decode(dialog.prompt_ids(dialog.turns)).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert dialog.turns[0]["role"] == "user" and dialog.turns[-2] == {"role": "user", "content": "Really?"}

    code, _, err = chat(ckpt, "--system", "Be brief.", "--message", "Hi.", "--message", "Who are you?",
                        "--message", "Why?", "--max-new-tokens", "40", "--temperature", "0", capsys=capsys)
    assert code == 0 and "tformer chat: dropped the oldest" in err


def test_a_message_that_cannot_fit_is_refused(ckpt, capsys, monkeypatch):
    long = "a" * 120
    err = one_line_error(*chat(ckpt, "--message", long, *GREEDY, capsys=capsys)[::2])
    assert "max_seq_len 128" in err and "shorten it" in err
    err = one_line_error(*chat(ckpt, "--max-new-tokens", "128", "--message", "Hi.", capsys=capsys)[::2])
    assert "max_seq_len - 1 = 127" in err
    with pytest.raises(ChatError):
        ChatSession(tformer.load(ckpt), Tokenizer.load(ckpt), ChatTemplate(), max_new_tokens=8).reply(long)

    _, expected, _ = chat(ckpt, "--message", "Hi.", *GREEDY, capsys=capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long}\nHi.\n"))  # interactive: noted, the chat goes on
    code, out, err = chat(ckpt, *GREEDY, capsys=capsys)
    assert code == 0 and out == expected and "error: this message is" in err


def test_interactive_lines_until_exit_eof_or_ctrl_c(ckpt, capsys, monkeypatch):
    _, expected, _ = chat(ckpt, "--message", "Hi.", "--message", "Why?", *GREEDY, capsys=capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi.\n\nWhy?\n/exit\nNever read.\n"))
    assert chat(ckpt, *GREEDY, capsys=capsys)[:2] == (0, expected)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi.\nWhy?"))  # EOF after the last line
    assert chat(ckpt, *GREEDY, capsys=capsys)[:2] == (0, expected)

    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert chat(ckpt, *GREEDY, capsys=capsys)[0] == 0  # at the prompt
    monkeypatch.undo()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi.\nWhy?\n"))
    monkeypatch.setattr("tformer.inference.chat.ChatSession.reply", lambda *a, **k: interrupted())
    assert chat(ckpt, *GREEDY, capsys=capsys)[:2] == (0, "\n")  # mid-reply: ends there
    assert chat(ckpt, "--message", "Hi.", *GREEDY, capsys=capsys)[0] == 130  # a script's run cut short


def test_a_checkpoint_without_a_template_chats_in_chatml(tmp_path, capsys):
    plain = chat_checkpoint(tmp_path / "plain", template=None)
    tok = Tokenizer.load(plain)
    template = ChatTemplate.for_checkpoint(plain, tok)
    assert template.is_default and end_of_turn(template) == "<|im_end|>"
    ids = tok.encode(template.render([{"role": "user", "content": "Hi."}], add_generation_prompt=True))
    expected = generate_text(tformer.load(plain), tok, [ids], 6, SamplingConfig(temperature=0),
                             ["<|eos|>", "<|im_end|>"])[0]
    assert chat(plain, "--message", "Hi.", *GREEDY, capsys=capsys)[:2] == (0, expected + "\n")
