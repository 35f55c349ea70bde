"""Triton ReLU linear attention vs the torch ops, forward and backward (CPU: through the Triton interpreter).

Every check is a function of ``device`` so tests/gpu can rerun them on CUDA.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dit.nn.attention.ops import linear_attention_reference, relu_linear_attention
from tests.tiny import KERNEL_DEVICE, assert_fp32_close, needs_triton

pytestmark = needs_triton

#: (batch, query tokens, key tokens, heads, key dim D, value dim E, keep mode, layout, target programs)
#: keep: None, "random" (some keys dropped) or "empty" (random, and batch row 1 drops every key).
#: layout "strided": q, k, v are non-contiguous views. programs: the state kernel's split target (None = the module
#: default, one token block per split here; 3 with 2 (batch, head) pairs: 2 splits of 2 blocks and 1 block).
CASES = [
    dict(batch=2, lq=37, lk=37, heads=2, d=12, e=12, keep=None, layout="contiguous", programs=None),
    dict(batch=2, lq=37, lk=20, heads=3, d=24, e=24, keep="empty", layout="strided", programs=None),
    dict(batch=2, lq=16, lk=45, heads=2, d=40, e=24, keep="random", layout="contiguous", programs=None),
    dict(batch=1, lq=70, lk=100, heads=1, d=72, e=72, keep="random", layout="strided", programs=None),
    dict(batch=2, lq=9, lk=130, heads=1, d=16, e=20, keep="empty", layout="contiguous", programs=3),
]
IDS = [
    f"b{c['batch']}-q{c['lq']}-k{c['lk']}-h{c['heads']}-d{c['d']}-e{c['e']}-{c['keep']}-{c['layout']}" for c in CASES
]


def make_inputs(case: dict, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random q (B, Lq, H, D), k (B, Lk, H, D), v (B, Lk, H, E) in ``dtype`` and the keep-mask (B, Lk) or None."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads = case["batch"], case["heads"]

    def tensor(length: int, dim: int) -> torch.Tensor:
        if case["layout"] == "strided":  # (B, H, L, C) storage seen as (B, L, H, C)
            x = torch.randn(batch, heads, length, dim, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(batch, length, heads, dim, generator=gen)
        return x.to(device=device, dtype=dtype)

    q, k, v = tensor(case["lq"], case["d"]), tensor(case["lk"], case["d"]), tensor(case["lk"], case["e"])
    keep = None
    if case["keep"] is not None:
        keep = torch.rand(batch, case["lk"], generator=gen) > 0.3  # (B, Lk)
        keep[0, 0] = True
        if case["keep"] == "empty":
            keep[1] = False
        keep = keep.to(device)
    return q, k, v, keep


@contextlib.contextmanager
def target_programs(programs: int | None):
    """Temporarily change the state kernel's split target (a case's ``programs``; None keeps the default)."""
    from dit.nn.kernels import linear_attention

    saved = linear_attention.TARGET_PROGRAMS
    linear_attention.TARGET_PROGRAMS = saved if programs is None else programs
    try:
        yield
    finally:
        linear_attention.TARGET_PROGRAMS = saved


def outputs_and_grads(fn, q, k, v, keep, weights):
    """``fn``'s output and the grads of ``(out * weights).sum()`` w.r.t. q, k, v (on detached copies of the inputs)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, keep)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    return out, grads


def check_forward(device: str, case: dict) -> None:
    """fp32 forward vs relu_linear_attention (1e-5) and the naive O(N^2) reference; dropped rows give 0."""
    from dit.nn.kernels.linear_attention import triton_linear_attention

    q, k, v, keep = make_inputs(case, device)
    with target_programs(case["programs"]):
        out = triton_linear_attention(q, k, v, keep)
    assert out.dtype == q.dtype and out.shape == (case["batch"], case["lq"], case["heads"], case["e"])
    assert_fp32_close(out, relu_linear_attention(q, k, v, keep), 1e-5)
    assert_fp32_close(out, linear_attention_reference(q, k, v, keep), 1e-5)
    if case["keep"] == "empty":
        assert out[1].abs().max().item() == 0.0


def check_grads(device: str, case: dict) -> None:
    """fp32 grads of q, k, v vs autograd through relu_linear_attention (1e-5) and the naive reference (1e-4)."""
    from dit.nn.kernels.linear_attention import triton_linear_attention

    q, k, v, keep = make_inputs(case, device)
    weights = torch.randn(q.shape[:3] + (case["e"],), generator=torch.Generator().manual_seed(5)).to(device)
    with target_programs(case["programs"]):
        _, grads = outputs_and_grads(triton_linear_attention, q, k, v, keep, weights)
    _, expected = outputs_and_grads(relu_linear_attention, q, k, v, keep, weights)
    _, naive = outputs_and_grads(linear_attention_reference, q, k, v, keep, weights)
    for name, actual, want, sanity in zip("qkv", grads, expected, naive):
        assert torch.isfinite(actual).all(), name
        assert actual.dtype == torch.float32
        assert_fp32_close(actual, want, 1e-5)
        assert_fp32_close(actual, sanity, 1e-4)


def check_partial_grads(device: str, case: dict) -> None:
    """Only some inputs need grad (the others are skipped): the grads that are asked for are unchanged."""
    from dit.nn.kernels.linear_attention import triton_linear_attention

    q, k, v, keep = make_inputs(case, device)
    weights = torch.randn(q.shape[:3] + (case["e"],), generator=torch.Generator().manual_seed(5)).to(device)
    _, expected = outputs_and_grads(relu_linear_attention, q, k, v, keep, weights)
    for wanted in ("v", "k", "q"):
        inputs = {name: t.detach().clone().requires_grad_(name == wanted) for name, t in zip("qkv", (q, k, v))}
        out = triton_linear_attention(inputs["q"], inputs["k"], inputs["v"], keep)
        (grad,) = torch.autograd.grad((out * weights).sum(), inputs[wanted])
        assert_fp32_close(grad, expected["qkv".index(wanted)], 1e-5)


def check_low_precision(device: str, case: dict, dtype: torch.dtype) -> None:
    """bf16/fp16 forward and grads vs the fp32 reference on the same (rounded) inputs, 2e-2 relative."""
    from dit.nn.kernels.linear_attention import triton_linear_attention

    q, k, v, keep = make_inputs(case, device, dtype)
    weights = torch.randn(q.shape[:3] + (case["e"],), generator=torch.Generator().manual_seed(5)).to(device)
    with target_programs(case["programs"]):
        out, grads = outputs_and_grads(triton_linear_attention, q, k, v, keep, weights)
    want, expected = outputs_and_grads(relu_linear_attention, q.float(), k.float(), v.float(), keep, weights)
    assert out.dtype == dtype
    assert_fp32_close(out.float(), want, 2e-2)
    for actual, wanted in zip(grads, expected):
        assert actual.dtype == dtype and torch.isfinite(actual).all()
        assert_fp32_close(actual.float(), wanted, 2e-2)


def check_split_precision(device: str, dtype: torch.dtype) -> None:
    """The fp32 state meets bf16/fp16 rows as hi + lo dots (~fp32 accurate, far better than one bf16/fp16 dot),
    also for states far beyond fp16's range; same for the backward's 1/den-weighted token reduction."""
    from dit.nn.kernels.linear_attention import _reduce_state, _rows_times_state

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 37, 3, 40, generator=gen).to(device=device, dtype=dtype)  # (B, L, H, K)
    state = torch.randn(2, 3, 40, 24, generator=gen) * torch.tensor([1e-3, 1.0, 3e5])[:, None, None]  # (B, H, K, N)
    state = state.to(device)
    out = _rows_times_state(x, state, 2, out_dtype=torch.float32)  # (B, L, H, N)
    tolerance = 1e-4 if dtype == torch.bfloat16 else 1e-5  # measured: ~3e-6 and ~3e-7 (one dot: 2e-3, 2e-4)
    want = torch.einsum("blhk,bhkn->blhn", x.float(), state)
    for b in range(2):
        for h in range(3):
            scale = want[b, :, h].abs().max().item()  # relative to each (batch, head)'s own magnitude
            assert_fp32_close(out[b, :, h], want[b, :, h], tolerance * min(1.0, scale))
    b = torch.randn(2, 37, 3, 24, generator=gen).to(device=device, dtype=dtype)
    den = (torch.rand(2, 37, 3, generator=gen) * 1e3 + 1e-6).to(device)  # (B, L, H) weights 1/den up to 1e6
    s = torch.randn(2, 37, 3, generator=gen).to(device)
    mat, vec = _reduce_state(x, b, den=den, s=s)
    xf = x.float().relu()
    assert_fp32_close(mat, torch.einsum("blhk,blhn->bhkn", xf / den[..., None], b.float()), tolerance)
    assert_fp32_close(vec, torch.einsum("blhk,blh->bhk", xf, s), 1e-5)


def check_overflow(device: str, dtype: torch.dtype) -> None:
    """q, k of magnitude ~1e3-6e4 in bf16/fp16: the output is finite, bounded by max |v|, close to the fp32 result,
    and the grads are finite (the fp32 state would overflow fp16 if it were cast naively)."""
    from dit.nn.kernels.linear_attention import triton_linear_attention

    case = dict(batch=2, lq=21, lk=37, heads=2, d=24, e=24, keep="empty", layout="contiguous")
    q, k, v, keep = make_inputs(case, device, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    big = torch.exp(torch.empty(q.shape).uniform_(6.9, 11.0, generator=gen)).to(device)  # 1e3 .. 6e4
    q = (q.sign() * big).to(dtype)
    k = (k.sign() * torch.exp(torch.empty(k.shape).uniform_(6.9, 11.0, generator=gen)).to(device)).to(dtype)
    v = (v * 3).to(dtype)
    weights = torch.randn(q.shape[:3] + (case["e"],), generator=torch.Generator().manual_seed(5)).to(device)
    out, grads = outputs_and_grads(triton_linear_attention, q, k, v, keep, weights)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.float().abs().max().item() <= v.float().abs().max().item() * (1 + 1e-3)
    assert_fp32_close(out.float(), relu_linear_attention(q.float(), k.float(), v.float(), keep), 2e-2)
    assert out[1].abs().max().item() == 0.0  # every key of batch row 1 dropped
    for grad in grads:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward(case):
    check_forward(KERNEL_DEVICE, case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grads(case):
    check_grads(KERNEL_DEVICE, case)


def test_partial_grads():
    check_partial_grads(KERNEL_DEVICE, CASES[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_low_precision(case, dtype):
    check_low_precision(KERNEL_DEVICE, case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_precision(dtype):
    check_split_precision(KERNEL_DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_overflow(dtype):
    check_overflow(KERNEL_DEVICE, dtype)
