"""The top-k sampling kernel (tformer.inference.kernels.sampling): it keeps exactly the logits >= the k-th largest
(ties included) and draws among them as softmax(logits / T). Interpreted on CPU without a GPU
(tests/conftest.py); the CUDA test runs on a GPU.
"""

import pytest
import torch

from tests.test_kernels import INTERPRETED, interpreted
from tformer.inference.kernels.sampling import ROW_COUNTERS

DEVICE = "cpu" if INTERPRETED else "cuda"


def _kept(logits: torch.Tensor, k: int) -> set[int]:
    kth = torch.topk(logits.float(), k).values[-1]
    return set(torch.nonzero(logits.float() >= kth).flatten().tolist())


def _check_keeps_exactly_the_k_best(dtype, device, rows: int):
    from tformer.inference.kernels.sampling import topk_sample

    torch.manual_seed(0)
    logits = (torch.randn(300) * 3).to(dtype)  # two blocks of 256 when interpreted
    logits[:40] = float("-inf")
    order = logits.float().argsort(descending=True)
    logits[order[5]] = logits[order[3]]  # a tie at the 4th largest: k=4 keeps five
    logits[order[1]] = -logits[order[1]].abs()  # a negative among the best
    order = logits.float().argsort(descending=True)
    for k in (1, 4):
        want = _kept(logits, k)
        hot = topk_sample(logits.expand(rows, -1).to(device), k, temperature=1e4)  # near uniform over the kept
        assert set(hot.tolist()) == want, (k, dtype)
        cold = topk_sample(logits.expand(4, -1).to(device), k, temperature=1e-4)  # the best only
        assert set(cold.tolist()) == {order[0].item()}


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_topk_sample_keeps_exactly_the_k_best(dtype):
    _check_keeps_exactly_the_k_best(dtype, DEVICE, rows=32)  # misses one of five with p = 0.004


def _seeds(rows: int, device) -> torch.Tensor:
    from tformer.inference.kernels.sampling import draw_seeds

    return draw_seeds(rows, device)


def _frequencies_match(device, rows: int, tol: float, step=None, seeds=None):
    from tformer.inference.kernels.sampling import topk_sample

    torch.manual_seed(1)
    V, k, T = 200, 6, 0.7  # two programs a row when interpreted
    logits = torch.randn(V).to(torch.bfloat16)
    got = topk_sample(logits.expand(rows, V).to(device), k, T, step=step, seeds=seeds)
    got = torch.bincount(got.cpu(), minlength=V).float() / rows
    top = torch.topk(logits.float(), k).indices
    want = torch.zeros(V)
    want[top] = torch.softmax(logits.float()[top] / T, 0)
    assert (got - want).abs().max() < tol, (got[top], want[top])
    assert got[want == 0].sum() == 0


@interpreted
def test_topk_sample_draws_softmax_of_the_kept():
    _frequencies_match(DEVICE, rows=256, tol=0.095)  # 3 standard deviations of the largest frequency


@interpreted
def test_topk_sample_with_a_step_draws_from_the_kept_seeds():
    """With a step, a row's draw depends on its kept seed and the step alone: the same pair repeats it,
    another step or other seeds change it, and the draws still follow softmax over the kept."""
    from tformer.inference.kernels.sampling import topk_sample

    rows, step = 16, torch.tensor([7], device=DEVICE)
    logits = torch.randn(rows, 300).to(DEVICE, torch.bfloat16)
    torch.manual_seed(5)
    seeds = _seeds(rows, DEVICE)
    counts = torch.zeros(rows * ROW_COUNTERS, dtype=torch.int32, device=DEVICE)
    first = topk_sample(logits, 50, 1.0, step=step, seeds=seeds, counts=counts)
    assert not counts.any()  # histograms and counts back at zero for the next call
    assert torch.equal(first, topk_sample(logits, 50, 1.0, step=step, seeds=seeds, counts=counts))
    assert not torch.equal(first, topk_sample(logits, 50, 1.0, step=step + 1, seeds=seeds))
    assert not torch.equal(first, topk_sample(logits, 50, 1.0, step=step, seeds=_seeds(rows, DEVICE)))
    torch.manual_seed(5)
    assert torch.equal(first, topk_sample(logits, 50, 1.0, step=step, seeds=_seeds(rows, DEVICE)))
    _frequencies_match(DEVICE, rows=256, tol=0.095, step=step, seeds=_seeds(256, DEVICE))
    with pytest.raises(ValueError, match="step must be a \\(1,\\) int64"):
        topk_sample(logits, 5, 1.0, step=torch.tensor([1, 2], device=DEVICE), seeds=seeds)
    with pytest.raises(ValueError, match="needs seeds"):
        topk_sample(logits, 5, 1.0, step=step)


@interpreted
def test_sample_takes_the_kernel_for_top_k_alone(monkeypatch):
    from tformer.inference import sampling
    from tformer.inference.sampling import SamplingConfig, sample
    from tformer.inference.workspace import Workspace

    calls = []
    original = sampling.topk_sample
    monkeypatch.setattr(sampling, "topk_sample", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    logits, ws = torch.randn(2, 50), Workspace("cpu", 2, 1)
    assert sample(logits, SamplingConfig(temperature=0.8, top_k=5), workspace=ws).shape == (2,)
    sample(logits, SamplingConfig(temperature=0.8, top_k=5))  # no engine workspace: PyTorch
    sample(logits, SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), workspace=ws)  # top-p needs the sorted path
    sample(logits, SamplingConfig(temperature=0.8, top_k=50), workspace=ws)  # k = V: no top-k at all
    sample(logits, SamplingConfig(temperature=0.0, top_k=5), workspace=ws)  # greedy
    assert len(calls) == 1


@interpreted
def test_topk_sample_compiles_for_any_batch_size():
    """A compiled step calls the sampler at a symbolic batch size after a second one is seen (the seeds'
    randint then has to take it; its generator overload does not)."""
    from tformer.inference.kernels.sampling import topk_sample

    compiled = torch.compile(lambda x: topk_sample(x, 3, 0.7), dynamic=True, fullgraph=True)
    for rows in (2, 3):
        logits = torch.randn(rows, 300)
        assert all(t in _kept(row, 3) for row, t in zip(logits, compiled(logits).tolist()))


@interpreted
def test_topk_sample_refuses_what_it_cannot_do():
    from tformer.inference.kernels.sampling import topk_sample

    with pytest.raises(ValueError, match="0 < k < V"):
        topk_sample(torch.randn(2, 8), 8, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        topk_sample(torch.randn(2, 8), 3, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_topk_sample_on_cuda():
    pytest.importorskip("triton")
    for dtype in (torch.bfloat16, torch.float32):
        _check_keeps_exactly_the_k_best(dtype, "cuda", rows=4096)
    _frequencies_match("cuda", rows=200_000, tol=0.005)
    from tformer.inference.kernels.sampling import topk_sample

    _frequencies_match("cuda", rows=200_000, tol=0.005, step=torch.tensor([3], device="cuda"),
                       seeds=_seeds(200_000, "cuda"))

    logits = torch.randn(8, 128256, device="cuda", dtype=torch.bfloat16)  # a Llama-3 vocabulary, batch 8
    counts = torch.zeros(8 * ROW_COUNTERS, dtype=torch.int32, device="cuda")
    tokens = topk_sample(logits, 200, 0.8, counts=counts)
    kth = torch.topk(logits.float(), 200).values[:, -1]
    assert (logits.float().gather(1, tokens[:, None]).squeeze(1) >= kth).all()
    assert not counts.any()  # histograms and counts
