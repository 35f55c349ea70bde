"""Triton token-layout depthwise convolution (LiT's ``dwc``) against the NCHW ``conv2d`` path of ``_add_value_conv``.

The bodies take a ``device`` so tests/gpu can rerun them on CUDA: ``check_dwc(device, case)`` over :data:`CASES`,
``check_tiles(device, case)`` over :data:`TILE_CASES`, ``check_strided``, ``check_module``, ``check_bf16`` and
``check_errors``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import KERNEL_DEVICE, assert_fp32_close, needs_triton

pytestmark = needs_triton

GRIDS = ((4, 4), (5, 7), (3, 2), (1, 6))
#: (k, grid, keep, residual): k 3/5 x even, odd non-square, smaller-than-k grids x with/without keep and residual
CASES = list(itertools.product((3, 5), GRIDS, (False, True), (False, True)))
#: (k, grid, keep, block_tokens, block_channels): several token and channel tiles (partials summed, masked tails)
TILE_CASES = [
    (3, (7, 9), True, 16, 16),
    (5, (9, 6), True, 16, 8),
    (5, (3, 10), False, 32, 64),
    (7, (6, 5), True, 8, 16),
    (5, (9, 8), True, 4, 16),  # the weight gradient's tiles: 16 tokens, 3 sample-wide partial rows over 72 tokens
]
BATCH, CHANNELS = 2, 24


def reference(v, grid, weight, bias=None, keep=None, residual=None) -> torch.Tensor:
    """``_add_value_conv``'s torch path: ``residual + grid_to_tokens(dwc(tokens_to_grid(v * keep)))``."""
    from dit.nn.attention.ops import grid_to_tokens, tokens_to_grid

    if keep is not None:
        v = v * keep[:, :, None].to(v.dtype)  # (B, N, C)
    k = weight.shape[-1]
    conv = F.conv2d(tokens_to_grid(v, grid), weight, bias, padding=k // 2, groups=v.shape[-1])  # (B, C, h, w)
    out = grid_to_tokens(conv)  # (B, N, C)
    return out if residual is None else residual + out


def _inputs(k, grid, keep, residual, device, channels=CHANNELS, dtype=torch.float32):
    """Random v, weight, bias (and residual) requiring grad, and a keep-mask with some dropped tokens."""
    n = grid[0] * grid[1]
    v = torch.randn(BATCH, n, channels, device=device, dtype=dtype, requires_grad=True)  # (B, N, C)
    weight = torch.randn(channels, 1, k, k, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(channels, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn_like(v).requires_grad_() if residual else None  # (B, N, C)
    mask = None
    if keep:
        mask = torch.rand(BATCH, n, device=device) > 0.3  # (B, N)
        mask[0, -1] = False  # always some padding, and one fully kept row
        mask[1] = True
    return v, weight, bias, mask, res


def _compare(v, grid, weight, bias, keep, res, tolerance=1e-5, **blocks) -> None:
    """Forward and every gradient (v, weight, bias, residual) of the kernel vs the reference, fp32."""
    from dit.nn.kernels.depthwise_conv import triton_token_dwc

    inputs = [t for t in (v, weight, bias, res) if t is not None]
    expected = reference(v, grid, weight, bias, keep, res)  # (B, N, C)
    actual = triton_token_dwc(v, grid, weight, bias, keep=keep, residual=res, **blocks)  # (B, N, C)
    assert actual.shape == expected.shape and actual.dtype == v.dtype and actual.is_contiguous()
    assert_fp32_close(actual, expected, tolerance)
    loss_weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, loss_weights)
    actual_grads = torch.autograd.grad(actual, inputs, loss_weights)
    for expected_grad, actual_grad in zip(expected_grads, actual_grads):
        assert actual_grad.shape == expected_grad.shape and actual_grad.dtype == expected_grad.dtype
        assert_fp32_close(actual_grad, expected_grad, tolerance)


def check_dwc(device: str, case: tuple) -> None:
    """Forward and the gradients of v, weight, bias and residual match ``conv2d`` on the NCHW view in fp32."""
    k, grid, keep, residual = case
    v, weight, bias, mask, res = _inputs(k, grid, keep, residual, device)
    _compare(v, grid, weight, bias, mask, res)


def check_tiles(device: str, case: tuple) -> None:
    """Several token / channel tiles per batch element, k up to 7, without a bias."""
    k, grid, keep, block_tokens, block_channels = case
    v, weight, _, mask, res = _inputs(k, grid, keep, True, device)
    _compare(v, grid, weight, None, mask, res, block_tokens=block_tokens, block_channels=block_channels)


def check_strided(device: str) -> None:
    """v and residual read in place: a channel slice of a wider tensor and a transposed (B, C, N); an expanded
    output gradient; a non-contiguous keep-mask."""
    grid, k = (5, 7), 3
    _, weight, bias, mask, _ = _inputs(k, grid, True, False, device)
    wide = torch.randn(BATCH, 35, 2 * CHANNELS, device=device)[..., CHANNELS:]  # (B, N, C), stride_n = 2C
    transposed = torch.randn(BATCH, CHANNELS, 35, device=device).transpose(1, 2)  # (B, N, C), stride_c = N
    keep_t = torch.stack([mask, mask], dim=-1)[..., 0]  # (B, N), stride_n = 2
    for v, res, keep in ((wide, transposed, mask), (transposed, wide, keep_t)):
        v, res = v.detach().requires_grad_(), res.detach().requires_grad_()
        assert not v.is_contiguous() and not res.is_contiguous()
        _compare(v, grid, weight, bias, keep, res)
    from dit.nn.kernels.depthwise_conv import triton_token_dwc

    v = torch.randn(BATCH, 35, CHANNELS, device=device, requires_grad=True)  # (B, N, C)
    out = triton_token_dwc(v, grid, weight, bias, keep=mask)
    (actual,) = torch.autograd.grad(out.sum(), [v])  # the gradient of a sum: expanded, stride 0
    (expected,) = torch.autograd.grad(reference(v, grid, weight, bias, mask).sum(), [v])
    assert_fp32_close(actual, expected, 1e-5)


def check_module(device: str) -> None:
    """The kernel with a ``DiTAttention``'s own ``dwc`` parameters matches its module applied as the processor does."""
    from dit.nn.attention import AttentionSpec, DiTAttention
    from dit.nn.attention.ops import grid_to_tokens, tokens_to_grid
    from dit.nn.kernels.depthwise_conv import triton_token_dwc

    grid, heads = (5, 7), 2
    attn = DiTAttention(
        CHANNELS, heads, CHANNELS // heads, spec=AttentionSpec(kernel="linear", conv_kernel_size=5)
    ).to(device)
    with torch.no_grad():
        attn.dwc.weight.normal_()
        attn.dwc.bias.normal_()
    v, _, _, keep, out = _inputs(5, grid, True, True, device)
    expected = out + grid_to_tokens(attn.dwc(tokens_to_grid(v * keep[:, :, None], grid)))  # (B, N, C)
    actual = triton_token_dwc(v, grid, attn.dwc.weight, attn.dwc.bias, keep=keep, residual=out)
    assert_fp32_close(actual, expected, 1e-5)
    params = [v, out, attn.dwc.weight, attn.dwc.bias]
    loss_weights = torch.randn_like(expected)
    for e, a in zip(
        torch.autograd.grad(expected, params, loss_weights), torch.autograd.grad(actual, params, loss_weights)
    ):
        assert_fp32_close(a, e, 1e-5)


def check_bf16(device: str) -> None:
    """bf16 v, weight, bias and residual: within bf16 rounding of the fp32 reference on the same (rounded) values."""
    from dit.nn.kernels.depthwise_conv import triton_token_dwc

    grid, k = (5, 7), 5
    v, weight, bias, mask, res = _inputs(k, grid, True, True, device)
    low = [t.detach().bfloat16().requires_grad_() for t in (v, weight, bias, res)]
    high = [t.detach().float().requires_grad_() for t in low]
    actual = triton_token_dwc(low[0], grid, low[1], low[2], keep=mask, residual=low[3])  # (B, N, C)
    expected = reference(high[0], grid, high[1], high[2], mask, high[3])
    assert actual.dtype == torch.bfloat16
    loss_weights = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(actual, low, loss_weights.bfloat16())
    expected_grads = torch.autograd.grad(expected, high, loss_weights)
    for a, e in zip((actual, *actual_grads), (expected, *expected_grads)):
        assert a.dtype == torch.bfloat16
        assert_fp32_close(a.float(), e, 2e-2)


def check_errors(device: str) -> None:
    """Bad arguments raise ``ValueError``."""
    from dit.nn.kernels.depthwise_conv import triton_token_dwc

    v = torch.randn(2, 12, 8, device=device)  # (B, N, C)
    weight = torch.randn(8, 1, 3, 3, device=device)
    bad = [
        dict(grid=(3, 5)),
        dict(weight=torch.randn(8, 1, 4, 4, device=device)),
        dict(weight=torch.randn(4, 1, 3, 3, device=device)),
        dict(bias=torch.randn(4, device=device)),
        dict(keep=torch.ones(2, 11, dtype=torch.bool, device=device)),
        dict(keep=torch.ones(2, 12, device=device)),
        dict(residual=torch.randn(2, 12, 4, device=device)),
        dict(block_tokens=24),
    ]
    for change in bad:
        kwargs = {**dict(grid=(3, 4), weight=weight), **change}
        with pytest.raises(ValueError):
            triton_token_dwc(v, **kwargs)
    with pytest.raises(ValueError):
        triton_token_dwc(v[0], (3, 4), weight)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dwc(case):
    check_dwc(KERNEL_DEVICE, case)


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tiles(case):
    check_tiles(KERNEL_DEVICE, case)


def test_strided():
    check_strided(KERNEL_DEVICE)


def test_module():
    check_module(KERNEL_DEVICE)


def test_bf16():
    check_bf16(KERNEL_DEVICE)


def test_errors():
    check_errors(KERNEL_DEVICE)
