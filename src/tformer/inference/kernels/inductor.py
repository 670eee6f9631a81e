"""A guard against a PyTorch inductor hang that tformer's custom ops can trigger (PyTorch 2.10-2.11).

The first time inductor lowers a custom op with no lowering of its own (each `tformer::` op), it logs
"Creating implicit fallback for:" with `OperatorIssue.operator_str(target, args, kwargs)`, which
those releases build eagerly, whatever the log level, from the `str` of every argument's IR. An IR
node's `str` prints its inputs' in full, so for an argument at the end of a deep chain of fallback
kernels (a decode step's layers of matvec and attention kernels, whose residual stream feeds
several of them) the string grows exponentially. Top-k sampling's first lowering in a process
usually comes in the prompt's graph, where its input is shallow; when that graph is found in
inductor's cache instead, it comes in the decode step's graph, whose compilation then hangs for
minutes (the same bug: vllm-project/vllm#43111). Newer releases format the message lazily.

`bound_operator_str()` replaces `operator_str` by one that names each argument's type and, for IR
nodes, its buffer name, without printing the graph behind it. It only changes that message (in
inductor's info log and in its missing-operator errors). The ops' fake implementations call it, so it
is in place before inductor lowers any graph that holds them, and `import tformer` does not load
inductor (several seconds) to apply it.
"""

from __future__ import annotations

import sys
import textwrap

_BOUND = {"done": False}


def _describe(arg) -> str:
    name = getattr(arg, "get_name", None)
    try:
        named = name() if callable(name) else None
    except Exception:  # IR nodes without a buffer raise here
        named = None
    return f"{type(arg).__name__}({named})" if named else type(arg).__name__


def operator_str(target, args, kwargs) -> str:
    """`OperatorIssue.operator_str` without the arguments' IR (module docstring)."""
    lines = [f"target: {target}"] + [f"args[{i}]: {_describe(a)}" for i, a in enumerate(args)]
    if kwargs:
        lines.append(f"kwargs: {', '.join(f'{k}={_describe(v)}' for k, v in kwargs.items())}")
    return textwrap.indent("\n".join(lines), "  ")


def bound_operator_str() -> None:
    """Install `operator_str` once inductor is loaded (a no-op before, and after the first time)."""
    if _BOUND["done"]:
        return
    exc = sys.modules.get("torch._inductor.exc")
    if exc is None or not hasattr(exc, "OperatorIssue"):
        return
    exc.OperatorIssue.operator_str = staticmethod(operator_str)
    _BOUND["done"] = True
