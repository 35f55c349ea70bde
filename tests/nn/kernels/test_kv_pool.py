"""Triton KV-compression pooling against :class:`KVCompress` (before its norm): forward and every gradient.

The bodies take a ``device`` so tests/gpu can rerun them on CUDA: ``check_pool(device, case)`` over :data:`CASES`,
``check_tiles(device, case)`` over :data:`TILE_CASES`, ``check_strided``, ``check_bf16`` and ``check_errors``; and
``KVCompress.forward_pair`` on fused keys and values (one launch for both): ``check_pair(device, case)`` over
:data:`PAIR_CASES`, ``check_fused_attention_launches(device, monkeypatch)`` and ``check_pair_not_side_by_side``.
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
#: (mode, padding, grid): every mode x padding on a square and a non-square grid, both odd (ratio 2)
PAIR_CASES = list(itertools.product(MODES, ("replicate", "none"), ((5, 5), (5, 7))))


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


class _CountLaunches:
    """Stands in for a Triton kernel: counts its launches (``kernel[launch](...)``) and runs it."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, launch):
        self.count += 1
        return self.kernel[launch]


def count_launches(monkeypatch) -> dict[str, _CountLaunches]:
    """Count the launches of the three kv_pool kernels: ``{"fwd": ..., "bwd_tokens": ..., "bwd_weight": ...}``."""
    from dit.nn.kernels import kv_pool

    counters = {}
    for name in ("fwd", "bwd_tokens", "bwd_weight"):
        counters[name] = _CountLaunches(getattr(kv_pool, f"_kv_pool_{name}"))
        monkeypatch.setattr(kv_pool, f"_kv_pool_{name}", counters[name])
    return counters


def _random_module(mode: str, padding: str, channels: int, device: str):
    """A ``KVCompress`` (ratio 2) whose conv weight, bias and norm weight, bias are all random."""
    from dit.nn.attention.kv_compress import KVCompress

    module = KVCompress(channels, 2, mode, padding).to(device)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    return module


def _compress(module, qkv: torch.Tensor, grid: tuple[int, int], pair: bool, loss_weights: tuple) -> tuple:
    """Keys and values of fused ``qkv`` (B, N, 3C) compressed by one pair call or two calls; then the gradients of
    ``qkv`` and of every parameter of ``module`` under ``loss_weights``."""
    _, keys, values = qkv.split(qkv.shape[-1] // 3, dim=-1)  # (B, N, C) x 3, side by side
    out = module.forward_pair(keys, values, grid) if pair else (module(keys, grid), module(values, grid))
    loss = sum((o * w).sum() for o, w in zip(out, loss_weights))
    return out, torch.autograd.grad(loss, [qkv, *module.parameters()])


def check_pair(device: str, case: tuple, monkeypatch) -> None:
    """``forward_pair`` on fused keys and values: one forward launch (one backward launch of each kernel) and one norm
    call; outputs and the gradient of the tokens bit-identical to two calls, parameter gradients within fp32."""
    from dit.nn.kernels import kernel_mode
    from dit.nn.kernels.kv_pool import pooled_grid

    mode, padding, grid = case
    module = _random_module(mode, padding, CHANNELS, device)
    qkv = torch.randn(BATCH, grid[0] * grid[1], 3 * CHANNELS, device=device, requires_grad=True)  # (B, N, 3C)
    cells = pooled_grid(grid, 2, padding)
    loss_weights = [torch.randn(BATCH, cells[0] * cells[1], CHANNELS, device=device) for _ in range(2)]
    norm_calls = []
    module.norm.register_forward_hook(lambda *args: norm_calls.append(1))
    with kernel_mode("1"):
        expected, expected_grads = _compress(module, qkv, grid, False, loss_weights)
        launches, norm_calls[:] = count_launches(monkeypatch), []
        actual, actual_grads = _compress(module, qkv, grid, True, loss_weights)
    assert {name: c.count for name, c in launches.items()} == {
        "fwd": 1, "bwd_tokens": 1, "bwd_weight": int(mode == "conv")
    }  # fmt: skip
    assert len(norm_calls) == 1
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and torch.equal(a, e)
    assert torch.equal(actual_grads[0], expected_grads[0])
    for a, e in zip(actual_grads[1:], expected_grads[1:]):  # conv weight and bias: summed over K and V in one launch
        assert_fp32_close(a, e, 1e-6)


def check_fused_attention_launches(device: str, monkeypatch) -> None:
    """A KV-compressed self-attention pools K and V in ONE kv_pool launch once its QKV projection is fused (two
    before), and computes the same attention and gradients."""
    from dit.nn.attention import AttentionSpec, DiTAttention
    from dit.nn.kernels import kernel_mode

    grid = (5, 7)
    attn = DiTAttention(CHANNELS, heads=2, dim_head=CHANNELS // 2, spec=AttentionSpec(kv_compress_ratio=2)).to(device)
    x = torch.randn(BATCH, grid[0] * grid[1], CHANNELS, device=device)  # (B, N, C)
    results = {}
    for fused in (False, True):
        attn.fuse_projections(fused)
        launches = count_launches(monkeypatch)
        with kernel_mode("1"):
            out = attn(x, grid=grid)  # (B, N, C)
            grads = torch.autograd.grad(out.square().sum(), list(attn.kv_compress.parameters()))
        results[fused] = out, grads, {name: c.count for name, c in launches.items()}
    assert results[False][2] == {"fwd": 2, "bwd_tokens": 2, "bwd_weight": 2}
    assert results[True][2] == {"fwd": 1, "bwd_tokens": 1, "bwd_weight": 1}
    for a, e in zip((results[True][0], *results[True][1]), (results[False][0], *results[False][1])):
        assert_fp32_close(a, e, 1e-5)  # the fused projection is another matmul: fp32, not bit, parity


def check_pair_not_side_by_side(device: str, monkeypatch) -> None:
    """Keys and values in separate tensors, or not adjacent, take two calls (two launches) with the same results."""
    from dit.nn.kernels import kernel_mode

    grid = (5, 7)
    module = _random_module("conv", "replicate", CHANNELS, device)
    qkv = torch.randn(BATCH, 35, 3 * CHANNELS, device=device)  # (B, N, 3C)
    queries, keys, values = qkv.split(CHANNELS, dim=-1)
    separate = (keys.contiguous(), values.contiguous())
    for pair in (separate, (values, keys), (queries, values), (keys, values.flip(0))):
        with kernel_mode("1"):
            expected = (module(pair[0], grid), module(pair[1], grid))
            launches = count_launches(monkeypatch)
            actual = module.forward_pair(*pair, grid)
        assert launches["fwd"].count == 2
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)


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


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pair(case, monkeypatch):
    check_pair(KERNEL_DEVICE, case, monkeypatch)


def test_fused_attention_launches(monkeypatch):
    check_fused_attention_launches(KERNEL_DEVICE, monkeypatch)


def test_pair_not_side_by_side(monkeypatch):
    check_pair_not_side_by_side(KERNEL_DEVICE, monkeypatch)
