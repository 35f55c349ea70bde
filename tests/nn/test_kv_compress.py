"""``KVCompress.forward_pair`` on the torch ops: keys and values of a fused projection pooled in one call.

The Triton path (one kv_pool launch for both) is tested in tests/nn/kernels/test_kv_pool.py.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dit.nn.attention import AttentionSpec, DiTAttention
from dit.nn.attention.kv_compress import KVCompress, side_by_side
from dit.nn.kernels import kernel_mode
from tests.tiny import assert_fp32_close

MODES = ("conv", "avg", "uniform", "ave")
#: (mode, padding, ratio, grid): every mode x padding, ratio 2 and 3, square and non-square odd grids
CASES = list(itertools.product(MODES, ("replicate", "none"), (2, 3), ((5, 5), (7, 5))))
#: the torch call each mode pools with (None: ``uniform`` slices, no call)
POOL_CALLS = {"conv": "conv2d", "avg": "avg_pool2d", "uniform": None, "ave": "interpolate"}
BATCH, CHANNELS = 2, 16


def _random_module(mode: str, padding: str, ratio: int) -> KVCompress:
    module = KVCompress(CHANNELS, ratio, mode, padding)
    with torch.no_grad():
        for parameter in module.parameters():  # conv weight, bias and the norm's weight, bias
            parameter.normal_()
    return module


def _fused_keys_values(grid: tuple[int, int], width: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection's output (B, N, width * C) and its last two C-column slices (the keys and values)."""
    fused = torch.randn(BATCH, grid[0] * grid[1], width * CHANNELS, requires_grad=True)  # (B, N, width*C)
    *_, keys, values = fused.split(CHANNELS, dim=-1)  # (B, N, C) x 2, side by side
    return fused, keys, values


def _count_calls(monkeypatch, name: str | None) -> list:
    """Count the calls of ``torch.nn.functional.<name>`` (every caller sees the counting one until the test ends)."""
    calls = []
    if name is not None:
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pair_equals_two_calls(case, monkeypatch):
    """One pooling call and one norm call; outputs and every gradient equal two ``forward`` calls (bit for bit but
    the conv's, whose grouped conv over 2C channels may round otherwise, and the parameters' summed gradients)."""
    mode, padding, ratio, grid = case
    module = _random_module(mode, padding, ratio)
    fused, keys, values = _fused_keys_values(grid)
    with kernel_mode("0"):
        expected = module(keys, grid), module(values, grid)  # (B, L', C) x 2
        pool_calls, norm_calls = _count_calls(monkeypatch, POOL_CALLS[mode]), []
        module.norm.register_forward_hook(lambda *args: norm_calls.append(1))
        actual = module.forward_pair(keys, values, grid)
    assert len(pool_calls) == int(mode != "uniform") and len(norm_calls) == 1
    loss_weights = [torch.randn_like(t) for t in expected]
    inputs = [fused, *module.parameters()]
    expected_grads, actual_grads = (
        torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, loss_weights)), inputs)
        for out in (expected, actual)
    )
    for e, a in zip((*expected, expected_grads[0]), (*actual, actual_grads[0])):  # outputs, the tokens' gradient
        assert a.shape == e.shape
        _assert_same(a, e, exact=mode != "conv")
    for e, a in zip(expected_grads[1:], actual_grads[1:]):  # parameters: K's and V's gradients summed otherwise
        assert_fp32_close(a, e, 1e-6)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(actual, expected)
    else:
        assert_fp32_close(actual, expected, 1e-6)


def test_side_by_side_finds_fused_keys_and_values_only():
    grid = (3, 4)
    fused, keys, values = _fused_keys_values(grid)
    _, kv_keys, kv_values = _fused_keys_values(grid, width=2)  # a cross-attention's fused to_kv
    queries = fused[..., :CHANNELS]
    assert side_by_side(keys, values) and side_by_side(kv_keys, kv_values)
    assert side_by_side(keys[:1], values[:1])  # one sample
    assert not side_by_side(values, keys)  # the wrong order
    assert not side_by_side(queries, values)  # a gap between them
    assert not side_by_side(keys.contiguous(), values.contiguous())  # separate projections
    assert not side_by_side(keys, values[:, :6])  # other shapes
    transposed = torch.randn(BATCH, 2 * CHANNELS, 12).transpose(1, 2)  # (B, N, 2C), channels not contiguous
    assert not side_by_side(transposed[..., :CHANNELS], transposed[..., CHANNELS:])
    flat = torch.randn(BATCH * 12 * CHANNELS + CHANNELS)
    overlapping = flat[:-CHANNELS].view(BATCH, 12, CHANNELS), flat[CHANNELS:].view(BATCH, 12, CHANNELS)
    assert not side_by_side(*overlapping)  # one (B, N, 2C) view would read a token twice


def test_pair_takes_two_calls_when_not_side_by_side_or_the_conv_is_wrapped():
    class CountingConv(torch.nn.Conv2d):  # as an adapter (PEFT) wraps it: forward_pair must call it
        calls = 0

        def forward(self, x):
            CountingConv.calls += 1
            return super().forward(x)

    grid = (5, 7)
    module = _random_module("conv", "replicate", 2)
    counting = CountingConv(CHANNELS, CHANNELS, 2, stride=2, groups=CHANNELS)
    counting.load_state_dict(module.conv.state_dict())
    _, keys, values = _fused_keys_values(grid)
    with kernel_mode("0"):
        expected = module(keys, grid), module(values, grid)
        module.conv = counting
        for pair in ((keys, values), (keys.contiguous(), values.contiguous())):
            CountingConv.calls = 0
            actual = module.forward_pair(*pair, grid)
            assert CountingConv.calls == 2
            for a, e in zip(actual, expected):
                assert torch.equal(a, e)


@pytest.mark.parametrize("mode", MODES)
def test_fused_kv_compressed_attention_matches_unfused(mode):
    """A KV-compressed self-attention with fused projections (the pair path) computes the unfused one (two calls)."""
    grid = (5, 7)
    attn = DiTAttention(CHANNELS, 2, CHANNELS // 2, spec=AttentionSpec(kv_compress_ratio=2, kv_compress_mode=mode))
    for parameter in attn.kv_compress.parameters():
        torch.nn.init.normal_(parameter)
    x = torch.randn(BATCH, grid[0] * grid[1], CHANNELS, requires_grad=True)  # (B, N, C)
    results = []
    for fused in (False, True):
        attn.fuse_projections(fused)
        out = attn(x, grid=grid)  # (B, N, C)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *attn.kv_compress.parameters()])))
    for unfused, fused in zip(*results):
        assert_fp32_close(fused, unfused, 1e-5)  # the fused projection is another matmul: fp32, not bit, parity
