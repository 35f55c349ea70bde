"""The host work around the Triton kernels: torch ops and kernel launches per attention-layer call.

On an H200 a layer of a few thousand tokens is bound by the host (bench/results/attention_scaling_cuda.json: a LiT
layer's time stays flat from 256 to 4096 tokens with the kernels), so every torch op the wrappers issue beside their
launches costs time there. Counted on the CPU with the launches recorded and skipped.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit.nn.attention import AttentionSpec, DiTAttention
from dit.nn.kernels import set_kernels
from tests.tiny import needs_triton

pytestmark = needs_triton
GRID = (4, 6)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches by name; recorded and not run (the interpreter's own tensor handling is not counted)."""
    from triton.runtime.interpreter import InterpretedFunction

    names: list[str] = []
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, grid, warmup, **k: names.append(self.fn.__name__))
    yield names
    set_kernels(None)


def _layer_call(mode: str, dtype: torch.dtype, backward: bool) -> tuple[list[str], torch.Tensor]:
    torch.manual_seed(0)
    layer = DiTAttention(32, 2, 16, spec=AttentionSpec(kernel="linear", conv_kernel_size=5)).to(dtype)
    x = torch.randn(1, GRID[0] * GRID[1], 32, dtype=dtype, requires_grad=backward)  # (1, N, C)
    set_kernels(mode)
    counter = _CountOps()
    with counter:
        out = layer(x, grid=GRID)
        if backward:
            out.float().sum().backward()
    return counter.ops, out


def _own_ops(ops: list[str]) -> list[str]:
    """The layer's ops besides the projections and head reshapes both paths share."""
    shared = {"aten.addmm", "aten.mm", "aten.view", "aten._unsafe_view", "aten.t", "aten.sum", "aten.detach"}
    return [op for op in ops if op not in shared]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_kernel_forward_issues_three_launches_and_few_torch_ops(launches, dtype):
    torch_ops, _ = _layer_call("0", dtype, backward=False)
    kernel_ops, _ = _layer_call("1", dtype, backward=False)
    assert sorted(launches) == ["_dwc_tokens", "_rows_kernel", "_state_kernel"]
    # the torch path: feature maps, casts, einsums, the value conv's layout; the kernels: buffers and two sums
    assert len(_own_ops(kernel_ops)) <= 12 < len(_own_ops(torch_ops)), (_own_ops(kernel_ops), _own_ops(torch_ops))


def test_the_kernel_backward_issues_six_launches_and_few_torch_ops(launches):
    kernel_ops, _ = _layer_call("1", torch.bfloat16, backward=True)
    assert sorted(launches) == sorted(["_state_kernel", "_rows_kernel", "_dwc_tokens"] + ["_rows_kernel"] * 3
                                      + ["_state_kernel", "_dwc_tokens", "_dwc_bwd_weight"])  # fmt: skip
    assert len(_own_ops(kernel_ops)) <= 60, _own_ops(kernel_ops)
