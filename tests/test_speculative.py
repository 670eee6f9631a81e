"""Speculative decoding: greedy = the target's own greedy tokens, the rejection step keeps the
target's distribution, stats add up, limits and stop ids hold."""

import copy
import os

import pytest
import torch

from tformer import build_model
from tformer.inference import SamplingConfig
from tformer.inference.speculative import SpecStats, speculative_generate, verify
from tformer.presets import get_preset

GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[1], [5, 17, 42, 3], [200, 9, 9, 31, 77, 120, 4]]


def _draft_config(target_config):
    return target_config.replace(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)


def _near_copy(model, std):
    """A draft that agrees with the target most of the time: its weights plus small noise."""
    near = copy.deepcopy(model)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * std)
    return near


@pytest.fixture(scope="module")
def models():
    """target, a small draft (agrees almost never), a near draft (agrees about 2/3 of the time)."""
    torch.manual_seed(0)
    # Untied: with tied embeddings a random-init model greedily repeats its last token forever.
    config = get_preset("tiny-llama").replace(tie_embeddings=False)
    target = build_model(config).eval()
    return target, build_model(_draft_config(config)).eval(), _near_copy(target, 0.002)


def _greedy_uncached(model, prompt, n):
    """The reference: `model` alone, a full uncached forward over the whole sequence per token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def _greedy_spec_uncached(target, draft, prompt, n, k):
    """Greedy speculative decoding with no caches: (accepted, target forwards), the reference for
    the stats. The prefill gives the first token; then rounds of k drafts until n tokens.
    A draft cache that went stale would change what the draft proposes, not the output."""
    seq, accepted, forwards = list(prompt) + _greedy_uncached(target, prompt, 1), 0, 1
    while len(seq) < len(prompt) + n:
        drafts = _greedy_uncached(draft, seq, k)
        with torch.no_grad():
            want = target(torch.tensor([seq + drafts]))[0, len(seq) - 1 :].argmax(-1).tolist()  # k + 1
        a = next((i for i, (d, w) in enumerate(zip(drafts, want)) if d != w), k)
        seq += drafts[:a] + [want[a]]
        accepted, forwards = accepted + a, forwards + 1
    return accepted, forwards


def _check_stats(out: list[int], stats: SpecStats, stopped: bool = False):
    assert 0 <= stats.accepted <= stats.proposed
    assert stats.emitted == len(out)
    if not stopped:  # each forward emits its accepted drafts + one target token; the last is cut to fit
        k = stats.proposed // max(stats.target_forwards - 1, 1)  # the prefill proposes nothing
        assert stats.accepted + stats.target_forwards - k <= len(out)
        assert len(out) <= stats.accepted + stats.target_forwards
    assert stats.tokens_per_target_forward == pytest.approx(len(out) / stats.target_forwards)
    if stats.proposed:
        assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.proposed)


@pytest.mark.parametrize("which", ["small", "near"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target_greedy(models, k, which):
    target, small, near = models
    draft = small if which == "small" else near
    proposed = accepted = 0
    for prompt in PROMPTS:
        out, stats = speculative_generate(target, draft, prompt, 12, k=k, sampling=GREEDY)
        assert out == _greedy_uncached(target, prompt, 12)
        assert (stats.accepted, stats.target_forwards) == _greedy_spec_uncached(target, draft, prompt, 12, k)
        _check_stats(out, stats)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    if which == "near":  # some drafts accepted, some rejected
        assert 0 < accepted < proposed


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-gpt2"])  # sliding window; learned positions
def test_greedy_equals_target_greedy_other_families(preset):
    target = build_model(get_preset(preset).replace(tie_embeddings=False)).eval()
    draft = _near_copy(target, 0.002)
    prompt = list(range(3, 40, 2))  # longer than tiny-mistral's window (16)
    out, stats = speculative_generate(target, draft, prompt, 20, k=3, sampling=GREEDY)
    assert out == _greedy_uncached(target, prompt, 20)
    assert (stats.accepted, stats.target_forwards) == _greedy_spec_uncached(target, draft, prompt, 20, 3)
    assert 0 < stats.accepted < stats.proposed


@pytest.mark.parametrize("k", [1, 4])
def test_draft_equal_to_target_accepts_everything(models, k):
    target, *_ = models
    prompt = PROMPTS[1]
    for draft in (target, copy.deepcopy(target)):  # one shared cache; two caches
        out, stats = speculative_generate(target, draft, prompt, 11, k=k, sampling=GREEDY)
        assert out == _greedy_uncached(target, prompt, 11)
        assert stats.acceptance_rate == 1.0
        _check_stats(out, stats)
        # The prefill's token, then rounds of k + 1 tokens (the last one cut to land on 11).
        assert stats.target_forwards == 1 + -(-10 // (k + 1))


def test_top_k_1_sampling_is_greedy(models):
    """top_k=1 makes p and q one-hot through the sampling path (softmax, residual, draws)."""
    target, draft, _ = models
    out, stats = speculative_generate(target, draft, PROMPTS[2], 10, k=3, sampling=SamplingConfig(top_k=1), seed=0)
    assert out == _greedy_uncached(target, PROMPTS[2], 10)
    _check_stats(out, stats)


# --- The rejection step keeps the target distribution (Leviathan et al. 2023, Theorem 3.5) ---

V, N = 6, 20_000


def _random_dists(shape, generator):
    logits = torch.randn(*shape, V, generator=generator) * 1.5
    probs = logits.softmax(-1)
    probs[..., 0] = 0.0  # a token ruled out by filtering, as top-k / top-p do
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_step_emits_target_distribution(k):
    g = torch.Generator().manual_seed(0)
    p, q = _random_dists((k + 1,), g), _random_dists((k,), g)
    p[0, 0] = 0.3  # a token the draft never proposes: only the residual can emit it
    p[0] /= p[0].sum()
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], 1)  # (N, k)
    n_acc, nxt = verify(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    first = torch.where(n_acc > 0, drafts[:, 0], nxt)  # the round's first emitted token
    freq = torch.bincount(first, minlength=V).float() / N
    torch.testing.assert_close(freq, p[0], atol=0.015, rtol=0)
    # Acceptance of d_1 happens with probability sum_x min(p(x), q(x)) (ibid., Definition 3.1).
    assert (n_acc > 0).float().mean().item() == pytest.approx(torch.minimum(p[0], q[0]).sum().item(), abs=0.015)


def test_rejection_step_all_accepted_draws_bonus_from_last_row():
    g = torch.Generator().manual_seed(1)
    k = 2
    q = _random_dists((k,), g)
    p = torch.cat([q, _random_dists((1,), g)])  # p == q at the draft slots: always accepted
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], 1)
    n_acc, nxt = verify(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    assert (n_acc == k).all()
    freq = torch.bincount(nxt, minlength=V).float() / N
    torch.testing.assert_close(freq, p[k], atol=0.015, rtol=0)


def test_rejection_step_greedy_is_argmax_agreement():
    one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), V).float()  # noqa: E731
    p = one_hot([2, 4, 1, 5])[None]  # target argmax at 3 draft slots + bonus
    n_acc, nxt = verify(p, one_hot([2, 4, 0])[None], torch.tensor([[2, 4, 0]]))
    assert (n_acc.item(), nxt.item()) == (2, 1)  # third draft disagrees: take the target's argmax
    n_acc, nxt = verify(p, one_hot([2, 4, 1])[None], torch.tensor([[2, 4, 1]]))
    assert (n_acc.item(), nxt.item()) == (3, 5)  # all agree: the bonus is the target's argmax


# --- Sampling, limits, stop ids, errors ---


def test_seeded_sampling_is_reproducible(models):
    target, draft, _ = models
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01)
    a = speculative_generate(target, draft, PROMPTS[1], 15, k=3, sampling=cfg, seed=7)
    b = speculative_generate(target, draft, PROMPTS[1], 15, k=3, sampling=cfg, seed=7)
    assert a == b
    _check_stats(*a)
    c, _ = speculative_generate(target, draft, PROMPTS[1], 15, k=3, sampling=cfg, seed=8)
    assert c != a[0]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 9])
def test_max_new_tokens_is_exact(models, n):
    target, small, near = models
    for d in (small, near, target):  # from short rounds to full ones that run into the limit
        for k in (1, 4):
            out, stats = speculative_generate(target, d, PROMPTS[0], n, k=k, sampling=SamplingConfig(), seed=0)
            assert len(out) == n
            if n:
                _check_stats(out, stats)


def test_stop_ids_end_generation(models):
    target, small, near = models
    for draft in (small, near):
        full, _ = speculative_generate(target, draft, PROMPTS[2], 12, k=4, sampling=GREEDY)
        stop = full[5]
        out, stats = speculative_generate(target, draft, PROMPTS[2], 12, k=4, sampling=GREEDY, stop_ids={stop})
        assert out == full[: full.index(stop) + 1]
        _check_stats(out, stats, stopped=True)


@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_rounds_queued_between_syncs_change_nothing(models, sync_every):
    """However many rounds run between host syncs: the same tokens and stats, stop ids and
    the token limit included (the rounds queued after a stop id are dropped)."""
    target, small, near = models
    sampled = SamplingConfig(temperature=0.9, top_k=50, repetition_penalty=1.2)
    for draft in (small, near):
        for cfg, stop in ((GREEDY, None), (sampled, None), (GREEDY, "6th")):
            full = speculative_generate(target, draft, PROMPTS[2], 13, k=2, sampling=cfg, seed=5, sync_every=1)
            stop_ids = {full[0][5]} if stop else None
            want = speculative_generate(target, draft, PROMPTS[2], 13, k=2, sampling=cfg, seed=5, stop_ids=stop_ids,
                                        sync_every=1)
            got = speculative_generate(target, draft, PROMPTS[2], 13, k=2, sampling=cfg, seed=5, stop_ids=stop_ids,
                                       sync_every=sync_every)
            assert got[0] == want[0]
            assert (got[1].accepted, got[1].proposed, got[1].target_forwards) == (
                want[1].accepted, want[1].proposed, want[1].target_forwards)
    with pytest.raises(ValueError, match="sync_every"):
        speculative_generate(target, small, [1, 2], 4, sync_every=0)


def test_mismatched_vocab_is_refused(models):
    target, *_ = models
    other = build_model(_draft_config(target.config).replace(vocab_size=128)).eval()
    with pytest.raises(ValueError, match="tokenizer"):
        speculative_generate(target, other, [1, 2], 4)


def test_too_long_request_is_refused(models):
    target, *_ = models
    short = build_model(_draft_config(target.config).replace(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="draft's max_seq_len"):
        speculative_generate(target, short, [1] * 10, 10)
    with pytest.raises(ValueError, match="target's max_seq_len"):
        speculative_generate(target, target, [1] * 100, 100)


def test_unsupported_settings_are_refused(models):
    target, small, _ = models
    with pytest.raises(ValueError, match="k "):
        speculative_generate(target, small, [1, 2], 4, k=0)


def test_repetition_penalty_greedy_equals_plain_decoding(models):
    """With the penalty, row i of the verify forward must count the drafts before it."""
    from tformer.inference import generate

    target, small, near = models
    cfg = SamplingConfig(temperature=0, repetition_penalty=1.5)
    for draft in (small, near, target):
        for prompt in PROMPTS:
            out, stats = speculative_generate(target, draft, prompt, 14, k=3, sampling=cfg)
            assert out == generate(target, [prompt], 14, cfg)[0]


def test_compiled_rounds_have_no_graph_breaks(models):
    """A compiling target engine's round (both models, with its bookkeeping) compiles whole (fullgraph
    raises on a break) and gives the eager tokens, with and without the repetition penalty."""
    from tformer.inference import DecodeEngine

    target, _, near = models
    for cfg in (GREEDY, SamplingConfig(temperature=0.8, top_k=20, repetition_penalty=1.3)):
        eager = speculative_generate(target, near, PROMPTS[1], 10, k=3, sampling=cfg, seed=3)
        engines = [DecodeEngine(m, compile=True, compile_backend="eager", cuda_graphs=True) for m in (target, near)]
        fast = speculative_generate(*engines, PROMPTS[1], 10, k=3, sampling=cfg, seed=3)
        for e in engines:
            e.close()
        assert fast == eager


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the top-k kernel runs interpreted (no GPU) or on a GPU")
def test_seed_decides_the_first_token_through_the_top_k_kernel(models):
    """With the decode kernels, the first token comes from the top-k kernel's kept seeds: each request
    draws them from its seed, so different seeds give different first tokens and the same seed the same."""
    pytest.importorskip("triton")
    from tformer.inference import DecodeEngine

    target, small, _ = models
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    target, small = copy.deepcopy(target).to(device), copy.deepcopy(small).to(device)
    cfg = SamplingConfig(temperature=50.0, top_k=100)  # close to uniform over 100 tokens
    engines = [DecodeEngine(m, kernels=True, max_batch_size=1) for m in (target, small)]
    firsts = [speculative_generate(*engines, PROMPTS[1], 1, k=2, sampling=cfg, seed=s)[0][0] for s in range(8)]
    again = speculative_generate(*engines, PROMPTS[1], 1, k=2, sampling=cfg, seed=3)[0][0]
    for e in engines:
        e.close()
    assert len(set(firsts)) > 1 and again == firsts[3]


def test_verify_compiles_for_any_batch_size():
    """A compiled round's random draws take symbolic batch sizes (the generator overloads of rand/randint
    do not: a second batch size failed to compile before)."""
    compiled = torch.compile(verify, dynamic=True, fullgraph=True)
    for B in (3, 5):
        p, q = torch.rand(B, 3, 11).softmax(-1), torch.rand(B, 2, 11).softmax(-1)
        n_acc, nxt = compiled(p, q, torch.randint(0, 11, (B, 2)))
        assert n_acc.shape == nxt.shape == (B,) and bool(((0 <= n_acc) & (n_acc <= 2)).all())
