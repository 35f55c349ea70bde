"""dit.nn.linear.Linear: half precision computed in fp32 where the CPU emulates it (tiled without gradients), exactly
``nn.Linear`` elsewhere, and traceable by ``torch.compile(fullgraph=True)`` either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit.nn import linear
from dit.nn.linear import Linear


def _reference(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(x.dtype)


@pytest.fixture(params=[True, False], ids=["emulated", "native"])
def emulated(request, monkeypatch):
    monkeypatch.setitem(linear.EMULATED_HALF, torch.bfloat16, request.param)
    return request.param


@pytest.mark.parametrize("grad", [False, True])
def test_half_precision_product(emulated, grad, monkeypatch):
    monkeypatch.setattr(linear, "ROW_CHUNK", 8)  # several row chunks and weight pieces without gradients
    monkeypatch.setattr(linear, "PIECE_ELEMENTS", 64 * 24)
    torch.manual_seed(0)
    layer = Linear(24, 200).to(torch.bfloat16)
    x = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    expected = _reference(x, layer) if emulated else F.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 200)
    assert torch.equal(out, expected)


def test_fp32_is_nn_linear():
    layer = Linear(8, 4)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_compiles_without_a_graph_break(emulated):
    """The CPU probe is read at import: a compiled graph sees a constant (the probe itself cannot be traced)."""
    torch.manual_seed(0)
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
