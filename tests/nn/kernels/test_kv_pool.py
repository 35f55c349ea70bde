"""Triton KV-compression pooling against :class:`KVCompress` (before its norm): forward and every gradient.

The bodies take a ``device`` so tests/gpu can rerun them on CUDA: ``check_pool(device, case)`` over :data:`CASES`,
``check_tiles(device, case)`` over :data:`TILE_CASES`, ``check_strided``, ``check_bf16`` and ``check_errors``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.tiny import KERNEL_DEVICE, assert_fp32_close, needs_triton

pytestmark = needs_triton

MODES = ("conv", "avg", "uniform", "ave")
#: (mode, padding, ratio, grid): every mode x padding x ratio 2/3 x even, odd/non-square, tall, smaller-than-ratio grid
CASES = list(itertools.product(MODES, ("replicate", "none"), (2, 3), ((4, 4), (5, 7), (6, 3), (1, 5))))
#: (mode, padding, ratio, grid, block_cells, block_channels): several cell and channel tiles, ratio 4
TILE_CASES = [
    ("conv", "replicate", 2, (7, 9), 4, 16),
    ("conv", "none", 2, (7, 9), 4, 16),
    ("avg", "replicate", 3, (8, 7), 2, 8),
    ("uniform", "replicate", 2, (7, 9), 4, 16),
    ("conv", "replicate", 4, (9, 6), 2, 16),
    ("conv", "replicate", 4, (3, 10), 32, 64),
    ("avg", "none", 4, (9, 6), 32, 16),
]
BATCH, CHANNELS = 2, 24


def _reference(mode: str, padding: str, ratio: int, channels: int, device: str):
    """A ``KVCompress`` with random conv weight and bias and no norm, so it outputs the pooled tokens."""
    from dit.nn.attention.kv_compress import KVCompress

    module = KVCompress(channels, ratio, mode, padding)
    module.norm = torch.nn.Identity()
    if mode == "conv":
        with torch.no_grad():
            module.conv.weight.normal_()
            module.conv.bias.normal_()
    return module.to(device)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """:func:`assert_fp32_close`, also for empty tensors (``uniform`` without a cell)."""
    if expected.numel() == 0:
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        return
    assert_fp32_close(actual, expected, tolerance)


def _run_both(mode, padding, ratio, grid, device, tokens, **blocks):
    """(expected, actual) outputs and (expected, actual) gradients of tokens (+ weight, bias for conv)."""
    from dit.nn.kernels.kv_pool import triton_kv_pool

    module = _reference(mode, padding, ratio, tokens.shape[-1], device)
    inputs = [tokens] + ([module.conv.weight, module.conv.bias] if mode == "conv" else [])
    expected = module(tokens, grid)  # (B, L', C)
    weight, bias = (module.conv.weight, module.conv.bias) if mode == "conv" else (None, None)
    actual = triton_kv_pool(tokens, grid, ratio, mode, padding, weight, bias, **blocks)  # (B, L', C)
    loss_weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, loss_weights)
    actual_grads = torch.autograd.grad(actual, inputs, loss_weights)
    return (expected, actual), list(zip(expected_grads, actual_grads))


def check_pool(device: str, case: tuple) -> None:
    """Forward and the gradients of tokens, conv weight and bias match the module in fp32 (or both raise)."""
    mode, padding, ratio, grid = case
    tokens = torch.randn(BATCH, grid[0] * grid[1], CHANNELS, device=device, requires_grad=True)  # (B, N, C)
    try:
        _reference(mode, padding, ratio, CHANNELS, device)(tokens, grid)
    except RuntimeError:  # no cell without padding: the torch ops raise, so must the kernel
        from dit.nn.kernels.kv_pool import triton_kv_pool

        weight = torch.randn(CHANNELS, 1, ratio, ratio, device=device)
        with pytest.raises(RuntimeError):
            triton_kv_pool(tokens, grid, ratio, mode, padding, weight)
        return
    (expected, actual), grads = _run_both(mode, padding, ratio, grid, device, tokens)
    assert actual.dtype == tokens.dtype and actual.is_contiguous()
    _assert_close(actual, expected)
    for expected_grad, actual_grad in grads:
        _assert_close(actual_grad, expected_grad)


def check_tiles(device: str, case: tuple) -> None:
    """Several cell / channel tiles per batch element (partial buffers summed, masked tails), ratio 4."""
    mode, padding, ratio, grid, block_cells, block_channels = case
    tokens = torch.randn(BATCH, grid[0] * grid[1], CHANNELS, device=device, requires_grad=True)  # (B, N, C)
    blocks = dict(block_cells=block_cells, block_channels=block_channels)
    (expected, actual), grads = _run_both(mode, padding, ratio, grid, device, tokens, **blocks)
    assert_fp32_close(actual, expected, 1e-5)
    for expected_grad, actual_grad in grads:
        assert_fp32_close(actual_grad, expected_grad, 1e-5)


def check_strided(device: str) -> None:
    """Tokens read in place through their strides: a channel slice of a wider tensor and a transposed (B, C, N)."""
    grid = (5, 7)
    wide = torch.randn(BATCH, 35, 2 * CHANNELS, device=device)[..., CHANNELS:]  # (B, N, C), stride_n = 2C
    transposed = torch.randn(BATCH, CHANNELS, 35, device=device).transpose(1, 2)  # (B, N, C), stride_c = N
    for tokens in (wide, transposed):
        tokens = tokens.detach().requires_grad_()
        assert not tokens.is_contiguous()
        (expected, actual), grads = _run_both("conv", "replicate", 3, grid, device, tokens)
        assert_fp32_close(actual, expected, 1e-5)
        for expected_grad, actual_grad in grads:
            assert_fp32_close(actual_grad, expected_grad, 1e-5)


def check_bf16(device: str) -> None:
    """bf16 tokens and weights: within bf16 rounding of the fp32 module on the same (rounded) values."""
    from dit.nn.kernels.kv_pool import triton_kv_pool

    grid, ratio = (5, 7), 2
    module = _reference("conv", "replicate", ratio, CHANNELS, device)
    tokens = torch.randn(BATCH, 35, CHANNELS, device=device).bfloat16()  # (B, N, C)
    weight = module.conv.weight.detach().bfloat16().requires_grad_()
    bias = module.conv.bias.detach().bfloat16().requires_grad_()
    with torch.no_grad():  # the fp32 reference on the bf16-rounded values
        module.conv.weight.copy_(weight.float())
        module.conv.bias.copy_(bias.float())
    tokens_32 = tokens.float().requires_grad_()
    tokens = tokens.requires_grad_()
    actual = triton_kv_pool(tokens, grid, ratio, "conv", "replicate", weight, bias)  # (B, L', C)
    expected = module(tokens_32, grid)
    assert actual.dtype == torch.bfloat16
    loss_weights = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(actual, [tokens, weight, bias], loss_weights.bfloat16())
    expected_grads = torch.autograd.grad(expected, [tokens_32, module.conv.weight, module.conv.bias], loss_weights)
    for a, e in zip((actual, *actual_grads), (expected, *expected_grads)):
        assert a.dtype == torch.bfloat16
        assert_fp32_close(a.float(), e, 1e-2)


def check_errors(device: str) -> None:
    """Bad arguments raise ``ValueError`` (as ``KVCompress`` and ``tokens_to_grid`` do)."""
    from dit.nn.kernels.kv_pool import triton_kv_pool

    tokens = torch.randn(1, 12, 8, device=device)  # (B, N, C)
    weight = torch.randn(8, 1, 2, 2, device=device)
    bad = [
        dict(mode="max"),
        dict(padding="zeros"),
        dict(ratio=1),
        dict(grid=(3, 5)),
        dict(weight=None),
        dict(weight=torch.randn(8, 1, 3, 3, device=device)),
        dict(block_cells=24),
    ]
    for change in bad:
        kwargs = {**dict(grid=(3, 4), ratio=2, mode="conv", padding="replicate", weight=weight), **change}
        with pytest.raises(ValueError):
            triton_kv_pool(tokens, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pool(case):
    check_pool(KERNEL_DEVICE, case)


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tiles(case):
    check_tiles(KERNEL_DEVICE, case)


def test_strided():
    check_strided(KERNEL_DEVICE)


def test_bf16():
    check_bf16(KERNEL_DEVICE)


def test_errors():
    check_errors(KERNEL_DEVICE)
