"""Chunked linear cross-entropy (tformer.train.linear_ce) against F.cross_entropy of the full fp32
logits: value and gradients (hidden, weight) with ignored targets, label smoothing, chunks that do not
divide N, a frozen or tied head, autocast, torch.compile; and no (N, V) tensor made on the way."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tformer.train.linear_ce import default_chunk_size, linear_cross_entropy

N, C, V = 37, 16, 50  # 37 rows: chunks of 8 or 5 leave a short last one


def inputs(shape=(N,), ignored_every: int = 4, dtype=torch.float32):
    hidden = torch.randn(*shape, C, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, dtype=dtype) / C**0.5).requires_grad_()
    targets = torch.randint(0, V, shape)
    targets.view(-1)[::ignored_every] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, **kw):
    loss = F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), **kw)
    return loss, *torch.autograd.grad(loss, (hidden, weight))


def ours(hidden, weight, targets, **kw):
    loss = linear_cross_entropy(hidden, weight, targets, **kw)
    return loss, *torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_value_and_gradients_equal_the_full_logits_formula(smoothing, reduction, chunk):
    hidden, weight, targets = inputs()
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    expected = reference(hidden, weight, targets, **kw)
    got = ours(hidden, weight, targets, chunk_size=chunk, **kw)
    for g, e, name in zip(got, expected, ("loss", "d hidden", "d weight")):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)


def test_batched_input_and_custom_ignore_index():
    hidden, weight, targets = inputs(shape=(3, 11))
    targets[targets == -100] = 7  # class 7 becomes the ignored one; -100 no longer appears
    expected = reference(hidden, weight, targets, ignore_index=7)
    got = ours(hidden, weight, targets, ignore_index=7, chunk_size=4)
    assert got[1].shape == hidden.shape
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_every_target_ignored_gives_zero_not_nan():
    hidden, weight, targets = inputs()
    targets.fill_(-100)
    assert F.cross_entropy((hidden @ weight.T).float(), targets).isnan()  # the formula's 0 / 0
    loss, d_hidden, d_weight = ours(hidden, weight, targets, chunk_size=8)
    assert loss.item() == 0.0
    assert not d_hidden.any() and not d_weight.any()


def test_frozen_weight_gets_no_gradient_and_hidden_the_same_one():
    hidden, weight, targets = inputs()
    _, expected, _ = reference(hidden, weight, targets)
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, targets, chunk_size=8).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_tied_head_sends_both_gradients_to_the_shared_parameter():
    emb = torch.nn.Embedding(V, C)
    tokens = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))
    F.cross_entropy((torch.tanh(emb(tokens)) @ emb.weight.T).float(), targets).backward()
    expected, emb.weight.grad = emb.weight.grad, None
    linear_cross_entropy(torch.tanh(emb(tokens)), emb.weight, targets, chunk_size=8).backward()
    torch.testing.assert_close(emb.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_value_alone():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(hidden, weight, targets)[0])


def test_bf16_autocast_matches_the_autocast_formula():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(hidden, weight, targets)
        got = ours(hidden, weight, targets, chunk_size=8)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32  # fp32 weight: fp32 gradient
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    for g, e in zip(got[1:], expected[1:]):  # bf16 matmuls; d weight rounded once per chunk
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_no_tensor_of_all_the_logits_is_made():
    hidden, weight, targets = inputs()
    with ShapeLog() as log:
        linear_cross_entropy(hidden, weight, targets, chunk_size=8, label_smoothing=0.1).backward()
    assert max(log.numels) == max(8 * V, V * C)
    with ShapeLog() as log:
        reference(hidden, weight, targets)
    assert max(log.numels) == N * V  # the check sees the formula's logits


def test_compiles_in_one_graph():
    """aot_eager: Dynamo's capture and AOTAutograd's forward/backward split, without inductor's codegen."""
    hidden, weight, targets = inputs(shape=(3, 11))
    fn = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    got = ours(hidden, weight, targets, chunk_size=8, label_smoothing=0.1)
    loss = fn(hidden, weight, targets, chunk_size=8, label_smoothing=0.1)
    for g, e in zip((loss, *torch.autograd.grad(loss, (hidden, weight))), got):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_inductor_compiled_equals_eager():
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)
    loss = torch.compile(linear_cross_entropy, fullgraph=True)(hidden, weight, targets, chunk_size=8)
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    expected = reference(hidden, weight.detach().requires_grad_(), targets)
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(d_hidden, expected[1], rtol=1e-5, atol=1e-6)


def test_default_chunk_is_about_512_mib_of_logits():
    assert default_chunk_size(128256) == 1024
    assert default_chunk_size(50304) == 2560
    assert default_chunk_size(10**9) == 128


@pytest.mark.parametrize("bad, message", [
    (dict(targets=torch.zeros(N + 1, dtype=torch.long)), "leading shape"),
    (dict(targets=torch.zeros(N)), "integer"),
    (dict(weight=torch.zeros(V, C + 1)), "weight"),
    (dict(reduction="none"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(weight=torch.zeros(V, C, dtype=torch.bfloat16)), "autocast"),
])
def test_bad_input_is_refused_with_what_was_wrong(bad, message):
    hidden, weight, targets = inputs()
    args = dict(hidden=hidden, weight=weight, targets=targets) | bad
    with pytest.raises((ValueError, TypeError), match=message):
        linear_cross_entropy(**args)
