"""tformer.inference.kernels.inductor: inductor's message for a custom op's first lowering names the arguments
without printing the IR graph behind them (PyTorch 2.10-2.11 built it eagerly, exponentially in a
decode step's depth), and the ops' fake implementations put that in place."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tformer.inference.kernels import inductor


def test_inductor_message_names_arguments_without_printing_them(monkeypatch):
    import torch._inductor.exc as exc

    monkeypatch.setattr(exc.OperatorIssue, "operator_str", exc.OperatorIssue.operator_str)  # restored after
    monkeypatch.setitem(inductor._BOUND, "done", False)
    with FakeTensorMode():  # as torch.compile traces: the fake implementation runs
        x, w = torch.empty(1, 64), torch.empty(32, 64)
        assert torch.ops.tformer.matvec(x, w, None, None, 0, 0).shape == (1, 32)
    assert inductor._BOUND["done"]

    class DeepNode:  # an IR node at the end of a long chain: its str would print the chain
        def get_name(self):
            return "buf7"

        def __str__(self):
            raise AssertionError("the argument's IR was printed")

    msg = exc.OperatorIssue.operator_str(torch.ops.tformer.matvec.default, [DeepNode(), 2], {"eps": DeepNode()})
    assert "tformer.matvec" in msg and "args[0]: DeepNode(buf7)" in msg and "args[1]: int" in msg
    assert "eps=DeepNode(buf7)" in msg
