"""Beam search (tformer.inference.beam): equal to HF generate(num_beams=k) on a tiny random Llama
converted by the production converter, the same for a prompt in a batch as alone, exact when no
beam is pruned, scores that are what they say; `tformer generate --beams`."""

import itertools

import pytest
import torch
import transformers

import tformer
from tests.conftest import tiny_config
from tests.reference.test_hf_parity import LLAMA, hf_model
from tformer.cli import main
from tformer.inference import BeamConfig, beam_search
from tformer.models.build import build_model

PROMPTS = [[5, 9, 14, 3, 22, 7], [31, 2, 8], [7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF LlamaForCausalLM, the same converted by tformer.load, end ids that the search meets
    at several lengths: tokens from the middle of its unconstrained best hypotheses)."""
    torch.manual_seed(0)
    hf = hf_model(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        hf.lm_head.weight.mul_(3)  # peakier distributions: beams part ways, end ids get chosen
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    free = beam_search(tformer.load(path).eval(), PROMPTS[:1], 8, beams=4, n_best=4).sequences[0]
    return hf, tformer.load(path).eval(), [free[0][2], free[1][3], free[2][5]]


def hf_beams(hf, prompt, max_new_tokens, config: BeamConfig, eos):
    out = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, num_beams=config.beams,
                      num_return_sequences=config.n_best, length_penalty=config.length_penalty,
                      early_stopping=config.early_stopping, min_new_tokens=config.min_new_tokens, eos_token_id=eos,
                      pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices != -1).sum(1).tolist()  # new tokens of each hypothesis
    sequences = [out.sequences[i, len(prompt): len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return sequences, out.sequences_scores


@pytest.mark.parametrize("length_penalty,early_stopping,min_new_tokens,n_eos", [
    (1.0, False, 0, 1), (0.0, True, 0, 3), (2.0, "never", 0, 3), (-1.0, False, 3, 3),
    (0.5, True, 2, 1), (1.0, "never", 0, 1), (0.0, False, 0, 3),
    (2.0, False, 0, 3), (2.0, True, 0, 1),  # the early-stopping rules decide these
])
def test_equals_hf_generate(llama, length_penalty, early_stopping, min_new_tokens, n_eos):
    hf, ours, eos = llama
    config = BeamConfig(beams=4, n_best=3, length_penalty=length_penalty, early_stopping=early_stopping,
                        min_new_tokens=min_new_tokens)
    got = beam_search(ours, PROMPTS, 10, config, eos_ids=eos[:n_eos])
    lengths = set()
    for b, prompt in enumerate(PROMPTS):
        expected, scores = hf_beams(hf, prompt, 10, config, eos[:n_eos])
        assert got.sequences[b] == expected, f"prompt {b}"
        torch.testing.assert_close(torch.tensor(got.scores[b]), scores, atol=1e-4, rtol=0)
        lengths |= {len(s) for s in expected}
    assert len(lengths) > 1 or length_penalty > 1  # ended by an end id as well as by the limit


def test_batched_equals_alone():
    torch.manual_seed(1)
    model = build_model(tiny_config(vocab_size=160, max_seq_len=48)).eval()
    for config in (BeamConfig(beams=3, n_best=3), BeamConfig(beams=5, n_best=2, length_penalty=0.6, penalty="gnmt",
                                                               early_stopping=True)):
        batch = beam_search(model, PROMPTS, 12, config, eos_ids=[3, 11, 40])
        for b, prompt in enumerate(PROMPTS):
            alone = beam_search(model, [prompt], 12, config, eos_ids=[3, 11, 40])
            assert batch.sequences[b] == alone.sequences[0]
            torch.testing.assert_close(torch.tensor(batch.scores[b]), torch.tensor(alone.scores[0]), atol=1e-5, rtol=0)


def test_one_beam_stopping_early_is_greedy():
    from tformer.inference import SamplingConfig, generate

    torch.manual_seed(4)
    model = build_model(tiny_config(vocab_size=160, max_seq_len=48)).eval()
    greedy = generate(model, PROMPTS, 20, SamplingConfig(temperature=0), stop_ids={3, 11, 40})
    result = beam_search(model, PROMPTS, 20, beams=1, early_stopping=True, eos_ids=[3, 11, 40])
    assert [rows[0] for rows in result.sequences] == greedy
    assert len({len(g) for g in greedy}) > 1


def _log_prob(model, prompt, new) -> float:
    """Summed log-prob of `new` after `prompt` from one cache-free forward."""
    tokens = torch.tensor([prompt + new])
    logp = torch.log_softmax(model(tokens)[0, len(prompt) - 1: -1].float(), dim=-1)
    return logp.gather(1, torch.tensor(new)[:, None]).sum().item()


@pytest.mark.parametrize("penalty", ["exponent", "gnmt"])
def test_scores_are_penalised_log_probs_best_first(penalty):
    torch.manual_seed(2)
    model = build_model(tiny_config(vocab_size=160)).eval()
    config = BeamConfig(beams=6, n_best=6, length_penalty=1.5, penalty=penalty)
    result = beam_search(model, PROMPTS[:2], 9, config, eos_ids=[3, 7, 11, 40])
    for prompt, rows, scores in zip(PROMPTS, result.sequences, result.scores):
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(r) for r in rows}) == len(rows)
        for row, score in zip(rows, scores):
            assert score == pytest.approx(_log_prob(model, prompt, row) / config.length_factor(len(row)), abs=1e-5)
    fewer = beam_search(model, PROMPTS[:2], 9, config, eos_ids=[3, 7, 11, 40], n_best=2)
    assert fewer.sequences == [rows[:2] for rows in result.sequences]
    assert fewer.scores == [s[:2] for s in result.scores]


def test_length_penalty_favours_length_as_it_grows(llama):
    _, ours, eos = llama
    mean_length = []
    for alpha in (-1.0, 0.0, 1.0, 3.0):
        result = beam_search(ours, PROMPTS, 10, beams=4, n_best=4, length_penalty=alpha, eos_ids=eos)
        best = [rows[0] for rows in result.sequences]
        mean_length.append(sum(map(len, best)) / len(best))
    assert mean_length == sorted(mean_length) and mean_length[0] < mean_length[-1]


def test_exact_search_when_nothing_is_pruned():
    """With beams >= V ** (T - 1) no hypothesis is ever dropped: the best is the best of all
    sequences up to T tokens that end in the end id or at T, found by enumeration."""
    torch.manual_seed(3)
    model = build_model(tiny_config(vocab_size=5)).eval()
    prompt, T, eos, V = [1, 4, 2], 3, 0, 5
    for alpha in (0.0, 1.0):
        candidates = [list(s) for n in range(1, T + 1) for s in itertools.product(range(V), repeat=n)
                      if (s[-1] == eos or n == T) and eos not in s[:-1]]
        scored = sorted(((_log_prob(model, prompt, s) / len(s) ** alpha, s) for s in candidates), reverse=True)
        result = beam_search(model, [prompt], T, beams=V ** (T - 1), n_best=3, length_penalty=alpha,
                             early_stopping="never", eos_ids=[eos])
        assert result.sequences[0] == [s for _, s in scored[:3]]
        assert result.scores[0] == pytest.approx([s for s, _ in scored[:3]], abs=1e-5)


@pytest.mark.parametrize("changes,message", [
    (dict(beams=0), "beams must be >= 1"), (dict(beams=2, n_best=3), "n_best must be between 1 and beams"),
    (dict(penalty="wu"), "penalty must be"), (dict(early_stopping="sometimes"), "early_stopping must be"),
    (dict(min_new_tokens=-1), "min_new_tokens must be"),
])
def test_bad_settings_are_refused(changes, message):
    model = build_model(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        beam_search(model, [[1, 2]], 4, **changes)


def test_bad_requests_are_refused():
    model = build_model(tiny_config(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        beam_search(model, [[1, 2]], 0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 16"):
        beam_search(model, [[1] * 10], 8)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        beam_search(model, [[1], []], 4)
    with pytest.raises(ValueError, match="token id 97 is outside the model's vocabulary"):
        beam_search(model, [[1], [5, 97]], 4)
    assert model.layers[0].attn.kv_cache is None  # caches dropped after a refusal too
    encoder = build_model(tiny_config(architecture="encoder", activation="gelu", norm="layernorm", positions="learned"))
    with pytest.raises(ValueError, match=r"Encoder \(encoder\) is not a decoder-only model"):
        beam_search(encoder, [[1, 2]], 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tformer.presets import get_preset
    from tformer.tokenizer import Tokenizer

    tok = Tokenizer.train_char("ROMEO: But soft, what light through yonder window breaks?\n")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    config = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, tie_embeddings=False)
    tformer.save(tformer.build_model(config), path, tokenizer=tok)
    return path, tok


def test_cli_beams_print_the_api_result(checkpoint, capsys):
    path, tok = checkpoint
    args = ["generate", str(path), "--prompt", "ROMEO:", "--prompt", "soft", "--max-new-tokens", "8", "--beams", "3",
            "--n-best", "2", "--length-penalty", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = beam_search(tformer.load(path), [tok.encode("ROMEO:"), tok.encode("soft")], 8, beams=3, n_best=2,
                         length_penalty=0.5, eos_ids=[tok.eos_id] if tok.eos_id is not None else None)
    for prompt, rows, scores in zip(["ROMEO:", "soft"], result.sequences, result.scores):
        for rank, (row, score) in enumerate(zip(rows, scores), 1):
            assert f"=== {prompt!r} #{rank} score {score:.4f}\n{prompt}{tok.decode(row)}\n" in out
    assert main(["generate", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--beams", "2",
                 "--gnmt-penalty", "--early-stopping", "never"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and "beam search: score" in out.err


@pytest.mark.parametrize("flags,message", [
    (["--beams", "0"], "--beams must be >= 1"),
    (["--beams", "2", "--n-best", "3"], "--n-best must be between 1 and --beams (2)"),
    (["--beams", "2", "--top-k", "5", "--seed", "1"], "does not take --top-k, --seed"),
    (["--beams", "2", "--temperature", "1.2"], "does not take --temperature"),
    (["--beams", "2", "--compile"], "does not take --compile"),
    (["--n-best", "2"], "--n-best set the beam search: add --beams K"),
    (["--beams", "2", "--min-new-tokens", "-1"], "--min-new-tokens must be >= 0"),
])
def test_cli_refuses_bad_beam_options(checkpoint, capsys, flags, message):
    path, _ = checkpoint
    assert main(["generate", str(path), "--prompt", "R", "--max-new-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_stepper_plugs_in_and_stops_early(llama):
    """beam_search drives any Stepper; with early_stopping=True a prompt stops at k finished hypotheses."""
    from tformer.inference.beam import DecoderStepper

    class Counting(DecoderStepper):
        steps = 0

        def step(self, tokens):
            Counting.steps += 1
            return super().step(tokens)

    _, ours, eos = llama
    plain = beam_search(ours, PROMPTS[:1], 30, beams=2, n_best=2, early_stopping=True, eos_ids=eos)
    counted = beam_search(Counting(ours), PROMPTS[:1], 30, beams=2, n_best=2, early_stopping=True, eos_ids=eos)
    assert (counted.sequences, counted.scores) == (plain.sequences, plain.scores)
    assert Counting.steps == max(len(s) for rows in plain.sequences for s in rows) - 1 < 29
