"""Bucketed decode steps: padding rows and wider tables change nothing; CUDA graphs replay the same
tokens as the eager steps (on a GPU)."""

import copy

import pytest
import torch

from tformer.models import build_model
from tformer.serve.engine import GenerationRequest, ServeEngine
from tformer.serve.graphs import DecodeGraphs, _powers_of_two
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(vocab_size=97, max_seq_len=96)).eval()


def test_buckets_are_powers_of_two_capped_at_the_limit():
    assert _powers_of_two(1) == [1]
    assert _powers_of_two(24) == [1, 2, 4, 8, 16, 24]
    assert _powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]


def run(model, prompts, **kw):
    engine = ServeEngine(copy.deepcopy(model), block_size=4, max_running=8, **kw)
    engine.start()
    try:
        streams = [engine.submit(GenerationRequest(p, 10, temperature=0.8, top_k=20, seed=i))
                   for i, p in enumerate(prompts)]
        return [[e.token_id for e in s] for s in streams], engine
    finally:
        engine.stop()


@torch.no_grad()
def test_a_padded_bucket_gives_the_rows_logits_of_an_exact_one(model):
    """3 rows run in the bucket of 4 with tables widened to 8 blocks: same logits as a forward of
    exactly those rows and blocks."""
    m = copy.deepcopy(model)
    engine = ServeEngine(m, block_size=4, max_running=8)
    graphs = engine.decode_graphs
    tables = [[1, 2], [3], [4, 5, 6]]
    for blocks in tables:  # fill the blocks with keys and values of a prefill
        engine.table.tables = torch.tensor([blocks])
        m.cache_slots = 4 * len(blocks)
        pos = torch.arange(4 * len(blocks) - 1)[None]
        m.features(torch.randint(97, pos.shape), input_pos=pos)
    tokens, positions = [5, 6, 7], [4 * len(b) - 1 for b in tables]
    got = graphs(tokens, positions, tables)
    for row, blocks in enumerate(tables):
        engine.table.tables = torch.tensor([blocks])
        m.cache_slots = 4 * len(blocks)
        want = m(torch.tensor([[tokens[row]]]), input_pos=torch.tensor([[positions[row]]]))[:, -1]
        torch.testing.assert_close(got[row: row + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_decode_gives_the_eager_tokens():
    torch.manual_seed(0)
    gpu = build_model(tiny_config(vocab_size=97, max_seq_len=96), device="cuda").eval()
    prompts = [torch.randint(97, (n,)).tolist() for n in (3, 9, 17, 5, 30)]
    eager, _ = run(gpu, prompts, cuda_graphs=False)
    graphed, engine = run(gpu, prompts, cuda_graphs=True)
    assert len(engine.decode_graphs.graphs) == len(engine.decode_graphs.batch_sizes) * len(engine.decode_graphs.widths)
    assert graphed == eager


def test_capture_without_cuda_is_refused(model):
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, None, 4, 2, 2, capture=True)
