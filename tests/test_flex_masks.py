"""FlexAttention's block masks for decoders (tformer.inference.flex): one per rule shared by layers, batches
and lengths (attention run at the bucket length, or a prefix-LM's bucket cut to each length), graphs
compiled once more for changing lengths, not every step, and the backend choice. Uncompiled, on CPU;
CUDA: test_flex_cuda.py."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.conftest import tiny_config
from tests.test_attention_variants import VARIANTS, _model
from tformer.inference.flex import crop, use_attention_backend, use_flex_attention, use_sdpa, wants_flex
from tformer.nn.variants import MaskInputs, dense_mask, layer_rules, mask_mod

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


def test_flex_block_masks_are_reused_across_layers_batches_and_lengths():
    model = _model("per_layer_windows")
    flex = use_flex_attention(model, compile=False, bucket=16)
    with torch.no_grad():
        for B, T in [(2, 13), (3, 9), (1, 16), (2, 5)]:  # one length bucket, changing batch sizes
            want = model(torch.randint(0, 97, (B, T)))
            assert want.shape == (B, T, 97)
        assert flex.builds == 2  # one per distinct rule (windows 3 and global), whatever B and T
        model(torch.randint(0, 97, (1, 20)))
        assert flex.builds == 4  # the next bucket
    use_sdpa(model)
    assert "core" not in vars(model.layers[0].attn) and model.make_mask is dense_mask


@pytest.mark.parametrize("name", ["causal", "prefix", "local_global"])
def test_a_cropped_block_mask_has_the_new_lengths_and_the_same_attention(name):
    """`crop` (the shared masks cut to a forward's length) gives flex_attention the lengths it checks
    (torch 2.11's `_adjust` kept the old ones), and attention equal to a mask built at that length."""
    rule = layer_rules(tiny_config(**VARIANTS[name]))[0]
    big, T = create_block_mask(mask_mod(rule, MaskInputs(torch.arange(24), 24)), None, None, 24, 24, device="cpu",
                               BLOCK_SIZE=8), 13
    exact = create_block_mask(mask_mod(rule, MaskInputs(torch.arange(T), T)), None, None, T, T, device="cpu",
                              BLOCK_SIZE=8)
    cropped = crop(big, T)
    assert tuple(cropped.seq_lengths) == (T, T)
    q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=cropped), flex_attention(q, k, v, block_mask=exact))


def test_where_a_mask_cannot_be_cropped_one_of_that_length_is_built_and_kept(monkeypatch):
    import tformer.inference.flex as flex_module

    model = _model("prefix")  # a prefix-LM's queries see later keys: its mask is cut, not its inputs padded
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = model(tokens)
        monkeypatch.setattr(flex_module, "crop", lambda block_mask, T: None)  # a torch that cannot say new lengths
        flex = use_flex_attention(model, compile=False, bucket=16)
        torch.testing.assert_close(model(tokens), want, atol=2e-5, rtol=1e-4)
        model(tokens)
    assert flex.builds == 2  # the 16-token bucket's mask, then the 11-token one, each once


@pytest.mark.parametrize("name", ["window", "local_global", "strided"])
def test_lengths_between_buckets_run_at_the_bucket_length(name):
    """Causal-bounded rules pad q, k, v to the bucket: the outputs are the dense ones, and the attention
    meets one shape per bucket, so compiled it needs one graph per bucket, not one per length."""
    dense, model = _model(name), _model(name)
    model.load_state_dict(dense.state_dict())
    flex = use_flex_attention(model, compile=False, bucket=16)
    shapes, attend = [], flex.attend
    flex.attend = lambda q, k, v, **kw: shapes.append(q.shape[2]) or attend(q, k, v, **kw)
    with torch.no_grad():
        for T in (9, 13, 16, 21, 30):
            tokens = torch.randint(0, 97, (1 + T % 2, T))
            torch.testing.assert_close(model(tokens), dense(tokens), atol=2e-5, rtol=1e-4)
    assert set(shapes) == {16, 32} and flex.builds == 2


def test_compiled_flex_compiles_once_more_for_changing_lengths_not_every_step():
    from torch._dynamo.utils import counters

    model = _model("softcap", positions="alibi")
    flex = use_flex_attention(model, compile=False)
    flex.attend = torch.compile(flex_attention, backend="eager")  # dynamo's guards, without inductor's codegen
    counters.clear()
    with torch.no_grad():
        for T in [10, 10, 12, 14, 9]:  # new packed rows every step: new block masks and score_mods
            segments = (torch.arange(T) >= T // 2).long().expand(2, T)
            model(torch.randint(0, 97, (2, T)), segments=segments)
    assert counters["stats"]["unique_graphs"] == 2  # the first shape, then lengths marked dynamic


def test_backend_choice():
    assert not wants_flex(_model("window", dim=96), "cpu") and wants_flex(_model("window", dim=96), "cuda")
    assert not wants_flex(_model("window"), "cuda")  # head_dim 8: under the CUDA kernels' 16
    assert not wants_flex(_model("causal"), "cuda")  # plain causal: FlashAttention through SDPA
    forced = _model("strided", attention={"pattern": "strided", "block": 3, "backend": "flex"})
    assert use_attention_backend(forced, "cpu", compile=False) is not None
    assert use_attention_backend(_model("prefix", attention={"pattern": "prefix", "prefix": 5, "backend": "sdpa"}),
                                 "cuda") is None
