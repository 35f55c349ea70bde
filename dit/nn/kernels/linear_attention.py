"""Triton ReLU linear attention (LiT): forward and backward, same semantics as
:func:`dit.nn.attention.ops.relu_linear_attention`.

Two generic kernels do all the work that scales with the token count:

* :func:`_state_kernel` reduces ``sum_n w_n relu(a_n)^T b_n`` (a ``(D, E)`` matrix) and ``sum_n s_n relu(a_n)`` (a
  ``(D,)`` vector) over tokens, per (batch, head), split over several programs into fp32 partial buffers that torch
  sums (deterministic, no atomics). Forward: the state ``kv`` and ``ksum`` from the keys and values (``w = s = keep``).
  Backward: ``dkv = relu(q)^T (g / den)`` and ``dksum = sum_n relu(q_n) dden_n``.
* :func:`_rows_kernel` multiplies token rows by a small fp32 state, ``rows @ S``, with per-mode epilogues: the
  forward output ``(relu(q) @ kv) / (relu(q) . ksum + eps)`` (it also saves the fp32 denominator), ``dq``
  (it also saves ``dden = -(g . o) / den``), ``dk`` and ``dv``.

Precision: every ``tl.dot`` takes operands in the input dtype and accumulates in fp32 (``ieee`` for fp32 inputs).
An fp32 state meets bf16/fp16 rows as two tensor-core dots, ``x @ hi + x @ lo`` with ``hi = S.to(dtype)`` and
``lo = (S - hi).to(dtype)``. For bf16 (fp32's exponent range) the rows kernel splits the fp32 state in registers;
for fp16 the host first scales the state per (batch, head) by a power of two (max ``|S|`` ~ 2**14) so ``hi`` and
``lo`` neither overflow nor underflow, and makes them (about 14 small torch ops: the host overhead that a layer of
a few thousand tokens is bound by on an H200, which is why bf16 avoids it). The output stays a convex combination of value rows, so it is
bounded by ``max |v|`` in any dtype. The backward uses the *saved output* (input dtype) for ``g . o``.

Inputs may be non-contiguous: every token tensor is addressed through its strides (the small states are made
contiguous on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit.nn.kernels import interpreting

#: The state kernel splits its token reduction until the launch has at least this many programs.
TARGET_PROGRAMS = 256
_BLOCK_TOKENS = 64  # tokens per tile (rows kernel and state kernel)
_STATE_MAX_EXPONENT = 14  # low-precision states are scaled so that max |S| < 2**14


def _tile(size: int) -> int:
    """A power-of-2 tile for a channel dimension: at least 16 (tl.dot), at most 64."""
    return min(64, max(16, triton.next_power_of_2(size)))


@triton.jit
def _relu(x):
    # compare in fp32: the interpreter compares bf16 tensors wrongly (free on GPU)
    return tl.where(x.to(tl.float32) > 0, x, 0.0).to(x.dtype)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (interpreter, bf16): triton's interpreter multiplies bf16 bit patterns; fp32 products of bf16 values are
    # exact, so this is what the GPU's bf16 tensor cores with fp32 accumulation compute
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _state_kernel(
    a_ptr, b_ptr, keep_ptr, den_ptr, s_ptr, mat_ptr, vec_ptr,
    L, H, DA, DB, CHUNK,
    sab, san, sah, sad,  # a (B, L, H, DA)
    sbb, sbn, sbh, sbd,  # b (B, L, H, DB)
    skb, skn,  # keep (B, L)
    HAS_KEEP: tl.constexpr, HAS_DEN: tl.constexpr, HAS_S: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    TILES_B: tl.constexpr,
):  # fmt: skip
    """One (split, batch*head, a-tile x b-tile): ``mat = sum_n w_n relu(a_n)^T b_n``, ``vec = sum_n s_n relu(a_n)``.

    ``w_n`` is ``keep_n`` (exact, on ``a``) and/or ``1 / den_n`` (fp32 ``den`` (B, L, H) contiguous, applied to ``b``
    in fp32 after dividing by the block's largest weight, then split hi + lo for low precision); ``s_n`` is
    ``keep_n`` times the fp32 ``s`` (B, L, H) contiguous when HAS_S. Partials: mat (S, B*H, DA, DB), vec (S, B*H, DA).
    """
    split = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    b, h = bh // H, bh % H
    offs_a = (tile // TILES_B) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = (tile % TILES_B) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok, b_ok = offs_a < DA, offs_b < DB
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    vec = tl.zeros((BLOCK_A,), dtype=tl.float32)
    start = split * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        rows = start + n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < L
        a_ptrs = a_ptr + b * sab + h * sah + offs_a[:, None] * sad + rows[None, :] * san
        at = _relu(tl.load(a_ptrs, mask=a_ok[:, None] & row_ok[None, :], other=0.0))  # (BLOCK_A, BLOCK_N)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + b * skb + rows * skn, mask=row_ok, other=0) != 0
            at = tl.where(keep[None, :], at, 0.0).to(at.dtype)
        b_ptrs = b_ptr + b * sbb + h * sbh + rows[:, None] * sbn + offs_b[None, :] * sbd
        bt = tl.load(b_ptrs, mask=row_ok[:, None] & b_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_B)
        if HAS_DEN:
            den = tl.load(den_ptr + (b * L + rows) * H + h, mask=row_ok, other=1.0)
            w = 1.0 / den
            top = tl.max(tl.where(row_ok, tl.abs(w), 0.0), axis=0)
            top = tl.where(top > 0, top, 1.0)
            scaled = bt.to(tl.float32) * (w / top)[:, None]  # |scaled| <= |b|: fits the input dtype
            if SPLIT:
                hi = scaled.to(bt.dtype)
                lo = (scaled - hi.to(tl.float32)).to(bt.dtype)
                acc += (_dot(at, hi, PRECISION, UPCAST) + _dot(at, lo, PRECISION, UPCAST)) * top
            else:
                acc += _dot(at, scaled, PRECISION, UPCAST) * top
        else:
            acc += _dot(at, bt, PRECISION, UPCAST)
        if HAS_S:
            s = tl.load(s_ptr + (b * L + rows) * H + h, mask=row_ok, other=0.0)
            vec += tl.sum(at.to(tl.float32) * s[None, :], axis=1)
        else:
            vec += tl.sum(at.to(tl.float32), axis=1)
    part = split * tl.num_programs(1) + bh
    mat_ptrs = mat_ptr + (part * DA + offs_a[:, None]) * DB + offs_b[None, :]
    tl.store(mat_ptrs, acc, mask=a_ok[:, None] & b_ok[None, :])
    first = (offs_a * 0 + tile % TILES_B) == 0  # only the first b-tile stores vec (as a tensor: the interpreter)
    tl.store(vec_ptr + part * DA + offs_a, vec, mask=a_ok & first)


@triton.jit
def _rows_kernel(
    x_ptr, hi_ptr, lo_ptr, inv_ptr, vec_ptr, o_ptr, den_ptr, dden_ptr, gate_ptr, keep_ptr, out_ptr,
    L, H, K, N, eps,
    sxb, sxn, sxh, sxk,  # x (B, L, H, K)
    sob, son, soh, sok,  # o (B, L, H, K), MODE 1
    sgb, sgn, sgh, sgj,  # gate (B, L, H, N)
    skb, skn,  # keep (B, L)
    syb, syn, syh, syj,  # out (B, L, H, N)
    MODE: tl.constexpr, RELU_X: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_KEEP: tl.constexpr, SPLIT: tl.constexpr, STATE_F32: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """One (row block, batch*head, output tile) of ``acc = x @ S``, S (B*H, K, N): with STATE_F32 the fp32 state
    itself (at ``hi_ptr``), split into hi + lo in registers for bf16 rows; else hi [+ lo] made on the host, times
    ``inv`` (fp16, whose range needs the host's power-of-two scaling).

    MODE 0 (forward): ``out = acc / den``, ``den = relu(x) . vec + eps`` (stored, fp32 (B, L, H)).
    MODE 1 (dq): ``out = acc / den + dden * vec``, ``dden = -(x . o) / den`` (stored), ``den`` loaded.
    MODE 2 (dk, dv): ``out = acc (+ vec)``. Then ``out *= [gate > 0]`` and ``out *= keep`` where asked.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    pid_j = tl.program_id(2)
    b, h = bh // H, bh % H
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok, col_ok = rows < L, cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    row_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_mask = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxn + ks[None, :] * sxk, mask=x_mask, other=0.0)
        if RELU_X:
            x = _relu(x)  # (BLOCK_N, BLOCK_K)
        s_ptrs = (bh * K + ks[:, None]) * N + cols[None, :]
        s_mask = k_ok[:, None] & col_ok[None, :]
        if STATE_F32:
            state = tl.load(hi_ptr + s_ptrs, mask=s_mask, other=0.0)  # (BLOCK_K, BLOCK_J) fp32
            if SPLIT:  # bf16 rows: fp32's exponent range, so hi and lo need no scaling
                hi = state.to(x.dtype)
                acc += _dot(x, hi, PRECISION, UPCAST)
                acc += _dot(x, (state - hi.to(tl.float32)).to(x.dtype), PRECISION, UPCAST)
            else:
                acc += _dot(x, state, PRECISION, UPCAST)
        else:
            acc += _dot(x, tl.load(hi_ptr + s_ptrs, mask=s_mask, other=0.0), PRECISION, UPCAST)
            if SPLIT:
                acc += _dot(x, tl.load(lo_ptr + s_ptrs, mask=s_mask, other=0.0), PRECISION, UPCAST)
        if MODE == 0:
            ksum = tl.load(vec_ptr + bh * K + ks, mask=k_ok, other=0.0)
            row_acc += tl.sum(x.to(tl.float32) * ksum[None, :], axis=1)
        if MODE == 1:
            o_ptrs = o_ptr + b * sob + h * soh + rows[:, None] * son + ks[None, :] * sok
            o = tl.load(o_ptrs, mask=x_mask, other=0.0)
            row_acc += tl.sum(x.to(tl.float32) * o.to(tl.float32), axis=1)
    if not STATE_F32:
        acc = acc * tl.load(inv_ptr + bh)
    stats = (b * L + rows) * H + h  # (B, L, H) row statistics
    first = row_ok & ((rows * 0 + pid_j) == 0)  # row statistics: the first output tile stores them
    if MODE == 0:
        den = row_acc + eps
        out = acc / den[:, None]
        tl.store(den_ptr + stats, den, mask=first)
    elif MODE == 1:
        den = tl.load(den_ptr + stats, mask=row_ok, other=1.0)
        dden = -row_acc / den
        bias = tl.load(vec_ptr + bh * N + cols, mask=col_ok, other=0.0)
        out = acc / den[:, None] + dden[:, None] * bias[None, :]
        tl.store(dden_ptr + stats, dden, mask=first)
    else:
        out = acc
        if HAS_BIAS:
            out += tl.load(vec_ptr + bh * N + cols, mask=col_ok, other=0.0)[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_GATE:
        gate = tl.load(gate_ptr + b * sgb + h * sgh + rows[:, None] * sgn + cols[None, :] * sgj, mask=y_mask, other=0)
        out = tl.where(gate.to(tl.float32) > 0, out, 0.0)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b * skb + rows * skn, mask=row_ok, other=0) != 0
        out = tl.where(keep[:, None], out, 0.0)
    y_ptrs = out_ptr + b * syb + h * syh + rows[:, None] * syn + cols[None, :] * syj
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=y_mask)


def _dot_options(dtype: torch.dtype) -> dict:
    """``ieee`` dots for fp32 (the default, ignored for bf16/fp16, is tf32); bf16 dots upcast when interpreting."""
    return dict(
        PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=dtype == torch.bfloat16 and interpreting()
    )


def _keep_args(keep: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if keep is None:
        return like, 0, 0
    keep = keep.view(torch.uint8)  # (B, L), bool storage read as bytes
    return keep, keep.stride(0), keep.stride(1)


def _reduce_state(
    a: torch.Tensor,
    b: torch.Tensor,
    keep: torch.Tensor | None = None,
    den: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_n w_n relu(a_n)^T b_n`` (B, H, DA, DB) and ``sum_n s_n relu(a_n)`` (B, H, DA), fp32 (see the kernel)."""
    batch, length, heads, dim_a = a.shape
    dim_b = b.shape[-1]
    block_a, block_b = _tile(dim_a), _tile(dim_b)
    tiles_b = triton.cdiv(dim_b, block_b)
    programs = batch * heads * triton.cdiv(dim_a, block_a) * tiles_b
    blocks = max(1, triton.cdiv(length, _BLOCK_TOKENS))
    splits = min(blocks, max(1, triton.cdiv(TARGET_PROGRAMS, programs)))
    chunk = triton.cdiv(blocks, splits) * _BLOCK_TOKENS
    splits = max(1, triton.cdiv(length, chunk))
    mat = torch.empty(splits, batch * heads, dim_a, dim_b, device=a.device, dtype=torch.float32)
    vec = torch.empty(splits, batch * heads, dim_a, device=a.device, dtype=torch.float32)
    keep_t, skb, skn = _keep_args(keep, a)
    grid = (splits, batch * heads, programs // (batch * heads))
    _state_kernel[grid](
        a, b, keep_t, den if den is not None else mat, s if s is not None else mat, mat, vec,
        length, heads, dim_a, dim_b, chunk, *a.stride(), *b.stride(), skb, skn,
        HAS_KEEP=keep is not None, HAS_DEN=den is not None, HAS_S=s is not None,
        SPLIT=den is not None and a.dtype != torch.float32, **_dot_options(a.dtype),
        BLOCK_N=_BLOCK_TOKENS, BLOCK_A=block_a, BLOCK_B=block_b, TILES_B=tiles_b,
    )  # fmt: skip
    mat, vec = mat.sum(0), vec.sum(0)  # (B*H, DA, DB), (B*H, DA): sums over the few splits
    return mat.view(batch, heads, dim_a, dim_b), vec.view(batch, heads, dim_a)


def _state_operands(state: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 state (B, H, K, N) -> (hi, lo, inverse scale (B*H,)) for ``x @ state`` with ``x`` in ``dtype``."""
    state = state.contiguous()
    if dtype == torch.float32:
        return state, state, torch.ones(state.shape[0] * state.shape[1], device=state.device)
    top = state.abs().amax(dim=(-2, -1))  # (B, H)
    exponent = (_STATE_MAX_EXPONENT - torch.frexp(top).exponent).clamp(-100, 100)
    exponent = torch.where(top > 0, exponent, torch.zeros_like(exponent))
    scale = torch.ldexp(torch.ones_like(top), exponent)  # (B, H), powers of two
    scaled = state * scale[..., None, None]  # (B, H, K, N), max |.| < 2**14
    hi = scaled.to(dtype)
    lo = (scaled - hi.float()).to(dtype)
    return hi, lo, (1.0 / scale).flatten()


def _rows_times_state(
    x: torch.Tensor,
    state: torch.Tensor,
    mode: int,
    *,
    out_dtype: torch.dtype,
    relu: bool = False,
    vec: torch.Tensor | None = None,
    o: torch.Tensor | None = None,
    den: torch.Tensor | None = None,
    dden: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Launch :func:`_rows_kernel`: x (B, L, H, K) times state (B, H, K, N) -> (B, L, H, N) in ``out_dtype``."""
    batch, length, heads, dim_k = x.shape
    dim_n = state.shape[-1]
    out = torch.empty(batch, length, heads, dim_n, device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    state_f32 = x.dtype != torch.float16  # fp32 / bf16 rows read the fp32 state itself (no host-side split)
    hi, lo, inv = (state.contiguous(),) * 3 if state_f32 else _state_operands(state, x.dtype)
    keep_t, skb, skn = _keep_args(keep, x)
    o_t, gate_t = (o if o is not None else x), (gate if gate is not None else out)
    block_j = _tile(dim_n)
    grid = (triton.cdiv(length, _BLOCK_TOKENS), batch * heads, triton.cdiv(dim_n, block_j))
    _rows_kernel[grid](
        x, hi, lo, inv, vec if vec is not None else inv, o_t, den if den is not None else inv,
        dden if dden is not None else inv, gate_t, keep_t, out,
        length, heads, dim_k, dim_n, eps, *x.stride(), *o_t.stride(), *gate_t.stride(), skb, skn, *out.stride(),
        MODE=mode, RELU_X=relu, HAS_BIAS=vec is not None, HAS_GATE=gate is not None, HAS_KEEP=keep is not None,
        SPLIT=x.dtype != torch.float32, STATE_F32=state_f32, **_dot_options(x.dtype),
        BLOCK_N=_BLOCK_TOKENS, BLOCK_K=_tile(dim_k), BLOCK_J=block_j,
    )  # fmt: skip
    return out


class _LinearAttention(torch.autograd.Function):
    """Forward: state kernel (kv, ksum) + rows kernel (output, saves den). Backward: rows kernel (dq, dden), state
    kernel (dkv, dksum), rows kernel twice (dk, dv)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, eps):
        kv, ksum = _reduce_state(k, v, keep=keep)  # (B, H, D, E), (B, H, D)
        den = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)  # (B, Lq, H)
        out = _rows_times_state(q, kv, 0, out_dtype=q.dtype, relu=True, vec=ksum, den=den, eps=eps)
        ctx.save_for_backward(q, k, v, keep, out, kv, ksum, den)
        return out  # (B, Lq, H, E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, keep, out, kv, ksum, den = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = dden = None
        if need_q or need_k:  # dq's kernel also yields dden = -(g . o) / den, which dk needs
            dden = torch.empty_like(den)  # (B, Lq, H)
            dq = _rows_times_state(
                grad, kv.transpose(-1, -2), 1, out_dtype=q.dtype, vec=ksum, o=out, den=den, dden=dden, gate=q
            )  # (B, Lq, H, D)
        if need_k or need_v:
            dkv, dksum = _reduce_state(q, grad, den=den, s=dden)  # (B, H, D, E), (B, H, D)
        if need_k:
            dk = _rows_times_state(v, dkv.transpose(-1, -2), 2, out_dtype=k.dtype, vec=dksum, gate=k, keep=keep)
        if need_v:
            dv = _rows_times_state(k, dkv, 2, out_dtype=v.dtype, relu=True, keep=keep)  # (B, Lk, H, E)
        return (dq if need_q else None), dk, dv, None, None


def triton_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """ReLU linear attention with Triton kernels, forward and backward (same semantics as
    :func:`dit.nn.attention.ops.relu_linear_attention`).

    q (B, Lq, H, D), k (B, Lk, H, D), v (B, Lk, H, E) in fp32, bf16 or fp16 (k and v are cast to q's dtype), any
    strides; ``keep`` (B, Lk) bool drops keys (False = padding). Returns (B, Lq, H, E) in q's dtype.
    """
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton_linear_attention supports fp32, bf16 and fp16, not {q.dtype}.")
    k, v = k.to(q.dtype), v.to(q.dtype)
    if keep is not None:
        keep = keep.to(device=k.device, dtype=torch.bool)
    return _LinearAttention.apply(q, k, v, keep, float(eps))
