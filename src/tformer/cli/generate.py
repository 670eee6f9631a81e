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
            "--prompt values run as one left-padded batch; a single prompt streams to the terminal. With an "
            "encoder-decoder (T5, Marian, transformer-base) each --prompt is a source (T5 wants its task prefix, "
            "e.g. 'translate English to German: ...') and the output is printed alone."
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
    add_beam_options(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the prompt's forward and the decode step (on GPU each replays a CUDA graph: the "
                        "prompt padded to a multiple of 64 tokens, the decode step with the whole loop's bookkeeping; "
                        "with --draft: each round, the draft steps and the verify, is one CUDA graph); "
                        "pays off for long generations on GPU")
    p.set_defaults(func=run)


def add_beam_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("beam search", "deterministic search for the most likely completions "
                             "(tformer.inference.beam_search; scores as HF generate(num_beams=K))")
    g.add_argument("--beams", type=int, metavar="K", help="beam search with K beams instead of sampling")
    g.add_argument("--n-best", type=int, default=1, metavar="N", help="print the N best completions of each prompt")
    g.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="a completion's score is its summed log-prob / length ** A (> 0 favours longer ones)")
    g.add_argument("--gnmt-penalty", action="store_true",
                   help="divide by GNMT's ((5 + length) / 6) ** A instead of length ** A")
    g.add_argument("--early-stopping", choices=["false", "true", "never"], default="false",
                   help="true: stop at K finished completions; false: when no live beam can beat them at its "
                        "current length; never: at its best possible length")
    g.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="no end token before N new tokens")


_SAMPLING_DEFAULTS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None}


def beam_config(args: argparse.Namespace):
    """The BeamConfig of the beam options (None without --beams), checked against the other options."""
    from tformer.inference.beam import BeamConfig

    beam_set = [f"--{n.replace('_', '-')}" for n, d in (("n_best", 1), ("length_penalty", 1.0), ("gnmt_penalty", False),
                ("early_stopping", "false"), ("min_new_tokens", 0)) if getattr(args, n) != d]
    if args.beams is None:
        if beam_set:
            raise UserError(f"{', '.join(beam_set)} set the beam search: add --beams K")
        return None
    sampling_set = [f"--{n.replace('_', '-')}" for n, d in _SAMPLING_DEFAULTS.items() if getattr(args, n) != d]
    sampling_set += ["--temperature"] * (args.temperature not in (0.0, 0.8))
    sampling_set += [f"--{n}" for n in ("draft", "compile") if getattr(args, n)]
    if sampling_set:
        raise UserError(f"--beams searches deterministically and does not take {', '.join(sampling_set)}: "
                        f"drop them, or drop --beams to sample")
    if args.beams < 1:
        raise UserError(f"--beams must be >= 1, got {args.beams}")
    if not 1 <= args.n_best <= args.beams:
        raise UserError(f"--n-best must be between 1 and --beams ({args.beams}), got {args.n_best}")
    if args.min_new_tokens < 0:
        raise UserError(f"--min-new-tokens must be >= 0, got {args.min_new_tokens}")
    stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
    return BeamConfig(args.beams, args.n_best, args.length_penalty, "gnmt" if args.gnmt_penalty else "exponent",
                      stopping, args.min_new_tokens)


def run(args: argparse.Namespace) -> int:
    from tformer.inference import DecodeEngine, EngineOptions, generate_text, load_tokenizer
    from tformer.sources import resolve_config

    beam = beam_config(args)
    sampling = sampling_config(args)
    tokenizer = load_tokenizer(args.path)
    prompts = args.prompt or ["\n"]
    if resolve_config(args.path)[0].architecture == "encoder_decoder":
        from tformer.cli.generate_seq2seq import run_seq2seq

        return run_seq2seq(args, load_model(args), tokenizer, prompts, sampling, beam)
    if beam is not None:
        return _beam(args, beam, tokenizer, prompts)
    if args.draft and len(prompts) != 1:
        raise UserError("--draft decodes one prompt at a time: pass a single --prompt")
    # on a GPU the engine swaps in tformer's decode kernels; with --compile it replays CUDA graphs
    options = EngineOptions(max_batch_size=len(prompts), compile=args.compile)
    engine = DecodeEngine(load_model(args), options)
    draft = DecodeEngine(load_model(args, args.draft), options) if args.draft else None
    ids, prompts = _fit_prompts(args, tokenizer, prompts, [e.model for e in (engine, draft) if e])  # before output
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


def _fit_prompts(args, tokenizer, prompts: list[str], models) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and the text to echo, checked against the models' max_seq_len.

    A prompt longer than max_seq_len - max_new_tokens (- speculate_k with --draft) is refused, or with
    --truncate-prompt cut to its last tokens that fit (echoed as those tokens decode, noted on stderr).
    """
    import sys

    from tformer.inference.text import prompt_ids

    max_seq_len = min(m.config.max_seq_len for m in models)
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


def _beam(args, beam, tokenizer, prompts: list[str]) -> int:
    """Beam search from each prompt; prints each of its n best completions (--stop cuts each at its
    first stop string) with its score, best first."""
    import sys

    from tformer.inference import beam_search
    from tformer.inference.text import _first_stop, eos_ids

    model = load_model(args)
    ids, prompts = _fit_prompts(args, tokenizer, prompts, [model])
    result = beam_search(model, ids, args.max_new_tokens, beam, eos_ids=eos_ids(tokenizer))
    for prompt, rows, scores in zip(prompts, result.sequences, result.scores):
        for rank, (row, score) in enumerate(zip(rows, scores), 1):
            text = tokenizer.decode(row)
            cut = _first_stop(text, args.stop)
            text = text if cut is None else text[:cut]
            if len(prompts) == 1 and beam.n_best == 1:
                print(prompt + text)
                print(f"beam search: score {score:.4f}", file=sys.stderr)
            else:
                print(f"=== {prompt!r} #{rank} score {score:.4f}\n{prompt}{text}\n")
    return 0
