"""A decode loop's bookkeeping after each step, in one kernel (Triton).

    nxt (B,) new tokens  ->  history[n] <- nxt,  n += 1,  token <- nxt (B, 1),  input_pos += 1

In the captured decode loop (`tformer.inference.graphs`) one program does all four writes between
the sampler and the next step's embedding, instead of a few compiled kernels of a few elements
each. It waits for the sampler before anything else (tformer/inference/README.md). Elsewhere (no
Triton, another device, other dtypes or layouts, more than 1024 rows) `record_step` makes the
same writes in PyTorch ops.
"""

from __future__ import annotations

import torch

from tformer.inference.kernels.base import DEVICE_TYPE, INTERPRET, triton, use_pdl

if triton is not None:
    import triton.language as tl

    from tformer.inference.kernels.base import _wait_for_previous_kernel

    @triton.jit
    def _record_kernel(nxt_ptr, token_ptr, pos_ptr, history_ptr, n_ptr, B, PDL: tl.constexpr, BLOCK_B: tl.constexpr):
        _wait_for_previous_kernel(PDL)
        b = tl.arange(0, BLOCK_B)
        ok = b < B
        t = tl.load(nxt_ptr + b, mask=ok)
        n = tl.load(n_ptr)
        tl.store(history_ptr + n * B + b, t, mask=ok)
        tl.store(token_ptr + b, t, mask=ok)
        tl.store(n_ptr, n + 1)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)


@torch.library.custom_op("tformer::record_step", mutates_args=("token", "input_pos", "history", "n"))
def record_step_op(nxt: torch.Tensor, token: torch.Tensor, input_pos: torch.Tensor, history: torch.Tensor,
                   n: torch.Tensor, pdl: bool = False) -> None:
    """The module docstring's writes; nxt (B,), token (B, 1), history (rows, B) contiguous, input_pos and
    n (1,), all int64."""
    B = nxt.shape[0]
    launch = {} if INTERPRET else {"launch_pdl": pdl, "num_warps": 1}
    _record_kernel[(1,)](nxt, token, input_pos, history, n, B, PDL=pdl, BLOCK_B=triton.next_power_of_2(B), **launch)


@record_step_op.register_fake
def _(nxt, token, input_pos, history, n, pdl=False):
    return None


def record_step(nxt: torch.Tensor, token: torch.Tensor, input_pos: torch.Tensor, history: torch.Tensor,
                n: torch.Tensor, pdl: bool | None = None) -> None:
    """history[n] <- nxt, n += 1, token <- nxt[:, None], input_pos += 1, in place (module docstring).
    nxt, token, history, input_pos and n are int64; history (rows, B); input_pos and n (1,)."""
    tensors = (nxt, token, input_pos, history, n)
    if (triton is not None and nxt.device.type == DEVICE_TYPE and all(t.dtype == torch.int64 for t in tensors)
            and token.is_contiguous() and history.is_contiguous() and nxt.shape[0] <= 1024):
        record_step_op(nxt.contiguous(), token, input_pos, history, n, use_pdl(nxt.device, pdl))
        return
    history.index_copy_(0, n, nxt[None])
    n += 1
    token.copy_(nxt[:, None])
    input_pos += 1
