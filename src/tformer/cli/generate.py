"""`tformer generate PATH --prompt ...`."""

from __future__ import annotations

import argparse

from tformer.cli import UserError
from tformer.cli.decoding import add_model_options, add_sampling_options, load_model, sampling_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a tformer checkpoint or an HF model directory",
        description=(
            "Complete prompts with a model. PATH is a tformer checkpoint or an HF model directory with its "
            "tokenizer.json; --adapter DIR merges a LoRA adapter trained on it into its weights first. Several "
            "--prompt values run as one left-padded batch; a single prompt streams to the terminal."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", help="checkpoint or HF model directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: a newline)")
    add_sampling_options(p, max_new_tokens=200)
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep a too-long prompt's last max_seq_len - max-new-tokens tokens (noted on stderr) "
                        "instead of refusing it")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_model_options(p)
    p.add_argument("--draft", metavar="PATH",
                   help="speculative decoding with this smaller model (same tokenizer); one prompt only")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens per round with --draft")
    p.add_argument("--compile", action="store_true",
                   help="compile the prompt's forward and the decode step (on GPU each replays a CUDA graph: the "
                        "prompt padded to a multiple of 64 tokens, the decode step with the whole loop's bookkeeping; "
                        "with --draft: each round, the draft steps and the verify, is one CUDA graph); "
                        "pays off for long generations on GPU")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.inference import DecodeEngine, EngineOptions, generate_text, load_tokenizer

    sampling = sampling_config(args)
    tokenizer = load_tokenizer(args.path)
    prompts = args.prompt or ["\n"]
    if args.draft and len(prompts) != 1:
        raise UserError("--draft decodes one prompt at a time: pass a single --prompt")
    # on a GPU the engine swaps in tformer's decode kernels; with --compile it replays CUDA graphs
    options = EngineOptions(max_batch_size=len(prompts), compile=args.compile)
    engine = DecodeEngine(load_model(args), options)
    draft = DecodeEngine(load_model(args, args.draft), options) if args.draft else None
    ids, prompts = _fit_prompts(args, tokenizer, prompts, [e for e in (engine, draft) if e])  # before any output
    if draft:
        return _speculative(args, engine, draft, tokenizer, sampling, ids[0], prompts[0])
    single = len(prompts) == 1
    if single:
        print(prompts[0], end="", flush=True)
    texts = generate_text(engine, tokenizer, ids, args.max_new_tokens, sampling, args.stop, args.seed,
                          stream=single)
    if single:
        print()
    else:
        for prompt, text in zip(prompts, texts):
            print(f"=== {prompt!r}\n{prompt}{text}\n")
    return 0


def _fit_prompts(args, tokenizer, prompts: list[str], engines) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and the text to echo, checked against the models' max_seq_len.

    A prompt longer than max_seq_len - max_new_tokens (- speculate_k with --draft) is refused, or with
    --truncate-prompt cut to its last tokens that fit (echoed as those tokens decode, noted on stderr).
    """
    import sys

    from tformer.inference.text import prompt_ids

    max_seq_len = min(e.model.config.max_seq_len for e in engines)
    k = args.speculate_k if args.draft else 0
    room = max_seq_len - args.max_new_tokens - k
    what = f"--max-new-tokens {args.max_new_tokens}" + (f" and --speculate-k {k}" if k else "")
    if room < 1:
        raise UserError(f"the model's max_seq_len {max_seq_len} minus {what} leaves no room for a prompt: "
                        f"ask for at most {max_seq_len - 1 - k} new tokens")
    ids, shown = [], []
    for i, prompt in enumerate(prompts):
        p = prompt_ids(tokenizer, prompt)
        name = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if len(p) > room:
            if not args.truncate_prompt:
                raise UserError(
                    f"{name} is {len(p)} tokens, but the model's max_seq_len {max_seq_len} minus {what} leaves "
                    f"room for {room}: shorten it, ask for fewer new tokens, or pass --truncate-prompt to keep "
                    f"its last {room} tokens"
                )
            print(f"tformer generate: kept the last {room} of {name}'s {len(p)} tokens "
                  f"(max_seq_len {max_seq_len} minus {what})", file=sys.stderr)
            p = p[-room:]
            prompt = tokenizer.decode(p)
        ids.append(p)
        shown.append(prompt)
    return ids, shown


def _speculative(args, engine, draft, tokenizer, sampling, ids: list[int], prompt: str) -> int:
    import sys

    from tformer.inference import speculative_text

    text, stats = speculative_text(engine, draft, tokenizer, ids, args.max_new_tokens, sampling,
                                   args.stop, args.seed, args.speculate_k)
    print(prompt + text)
    print(f"speculative decoding: {stats.accepted}/{stats.proposed} draft tokens accepted "
          f"({stats.acceptance_rate:.0%}), {stats.tokens_per_target_forward:.2f} tokens per target forward",
          file=sys.stderr)
    return 0
