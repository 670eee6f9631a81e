"""`tformer chat PATH`: a conversation in the terminal (tformer.inference.chat does the work)."""

from __future__ import annotations

import argparse
import sys

from tformer.cli import UserError
from tformer.cli.decoding import add_model_options, add_sampling_options, load_model, sampling_config

HELP = "/reset clears the conversation (the system prompt stays), /system TEXT sets a new system prompt " \
       "(and clears), /exit or Ctrl-D ends"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal, in its chat template",
        description=(
            "A multi-turn conversation with a tformer checkpoint or HF model directory. Each turn the whole "
            "conversation is rendered with the checkpoint's chat template (ChatML when it has none), and the "
            "reply streams to the terminal until the template's end of turn, the tokenizer's EOS or "
            f"--max-new-tokens. Lines starting with / are commands: {HELP}. With --message the messages are "
            "answered in turn, each reply printed, and the command ends (for scripts). A conversation that "
            "outgrows the model's max_seq_len loses its oldest exchanges, noted on stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", help="checkpoint or HF model directory (with its tokenizer.json)")
    p.add_argument("--message", action="append", metavar="TEXT",
                   help="answer this message and go on to the next; no prompt is read (repeatable; commands "
                        "such as /reset work here too)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (None: the template's own, if it has one)")
    add_sampling_options(p, max_new_tokens=None, max_new_tokens_help="the most tokens of a reply (None: 256, or half "
                                                                     "the model's max_seq_len if that is less)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _chat(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or answering --message: no traceback
        print(file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace) -> int:
    from tformer.adapters.merge import chat_template_folder
    from tformer.chat import ChatTemplate
    from tformer.inference import DecodeEngine, EngineOptions, load_tokenizer
    from tformer.inference.chat import ChatSession

    sampling = sampling_config(args)
    tokenizer = load_tokenizer(args.path)
    template = ChatTemplate.for_checkpoint(chat_template_folder(args.path, args.adapter), tokenizer)
    engine = DecodeEngine(load_model(args), EngineOptions(max_batch_size=1))
    chat = ChatSession(engine, tokenizer, template, args.system, args.max_new_tokens, sampling, args.seed,
                          on_note=_note)
    if args.message is not None:
        for line in args.message:
            _handle(chat, line, interactive=False)
        return 0
    return _interactive(chat, args.path, template.is_default)


def _interactive(chat, path: str, chatml: bool) -> int:
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        which = "ChatML (the checkpoint has no chat template)" if chatml else "the checkpoint's chat template"
        _note(f"chatting with {path} in {which}; {HELP}")
    while True:
        try:
            line = input(">>> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print()
            return 0
        try:
            if not _handle(chat, line, interactive=True):
                return 0
        except KeyboardInterrupt:  # mid-reply: the engine has cleaned up (generate's finally)
            print()
            return 0


def _handle(chat, line: str, interactive: bool) -> bool:
    """Answer one input line (a message or a /command); False for /exit."""
    from tformer.chat import ChatTemplateError
    from tformer.inference.chat import ChatError

    command, _, rest = line.strip().partition(" ")
    if command == "/exit":
        return False
    if command == "/reset":
        chat.reset()
        _note("conversation cleared" + (" (the system prompt stays)" if chat.system else ""))
    elif command == "/system":
        chat.set_system(rest.strip())
        _note(("system prompt set" if chat.system else "system prompt removed") + "; conversation cleared")
    elif command.startswith("/"):
        if not interactive:
            raise UserError(f"unknown command {command} (a message starting with / is a command): {HELP}")
        _note(f"unknown command {command}: {HELP}")
    elif line.strip():
        try:
            chat.reply(line, stream=_write)
        except (ChatError, ChatTemplateError) as e:
            if not interactive:
                raise UserError(str(e)) from None
            _note(f"error: {e}")
            return True
        print(flush=True)
    return True


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"tformer chat: {text}", file=sys.stderr, flush=True)
