"""Triton depthwise convolution of tokens on their grid, in the token layout: LiT's value convolution (``dwc``).

Tokens ``(B, h*w, C)`` lie row-major on an ``(h, w)`` grid. :func:`triton_token_dwc` computes exactly
``residual + grid_to_tokens(conv2d(tokens_to_grid(v * keep[..., None], grid), weight, bias, padding=k // 2,
groups=C))`` (odd ``k``, zero padding at the borders) without the NCHW round trip: one program handles ``BLOCK_N``
tokens x ``BLOCK_C`` channels of one batch element and loops over the ``k * k`` taps (``tl.static_range``), reading
each tap's neighbours at token offsets ``di * w + dj`` (masked outside the grid and on dropped tokens), accumulating
in fp32 and adding the bias and the residual before one store.

Backward (Triton, deterministic, no atomics):

- ``v``: the same kernel with the flipped kernel over the output gradient, times ``keep`` of each token;
- ``weight`` and ``bias``: one kernel over token tiles; each program writes, per tap, the sum over its tokens of the
  output gradient times the (kept) neighbour, and the sum of the output gradient (bias), into a partial buffer
  ``(B, tiles, k*k + 1, C)`` fp32 that ``torch.sum`` reduces;
- ``residual``: the output gradient itself.

Inputs are read in place through their strides (any layout); outputs are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import row_channel_tile


@triton.jit
def _neighbours(rows, cols, di, dj, height, width, tok_ok):
    """Token index (int64) of the neighbours ``(row + di, col + dj)`` and whether they lie inside the grid."""
    r = rows + di
    c = cols + dj
    inside = tok_ok & (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return (r * width + c).to(tl.int64), inside


@triton.jit
def _load_rows(base, keep_base, idx, ok, chan_ok, sxn, skn, HAS_KEEP: tl.constexpr):
    """fp32 tile ``x[idx, chans]`` (BN, BC), zero where ``ok`` is False or (with HAS_KEEP) the token is dropped."""
    if HAS_KEEP:
        ok = ok & (tl.load(keep_base + idx * skn, mask=ok, other=0) != 0)
    return tl.load(base + idx[:, None] * sxn, mask=ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dwc_tokens(
    x_ptr, keep_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    N, C, height, width,
    sxb, sxn, sxc, skb, skn, srb, srn, src,
    K: tl.constexpr, BACKWARD: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Forward: ``out = sum_taps w[tap] * (x * keep)[token + tap - pad] (+ bias) (+ res)``. BACKWARD (the gradient of
    ``v`` from the output gradient ``x``): ``out = keep * sum_taps w[tap] * x[token - tap + pad]``. ``w`` is
    ``(k*k, C)`` contiguous, ``out`` ``(B, N, C)`` contiguous."""
    b, toks, chans, tok_ok, chan_ok = row_channel_tile(N, C, BLOCK_N, BLOCK_C)  # (BN,), (BC,)
    rows = toks // width
    cols = toks % width
    x_base = x_ptr + b * sxb + chans.to(tl.int64)[None, :] * sxc  # (1, BC)
    keep_base = keep_ptr + b * skb
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for di in range(K):  # loops, not unrolled: 25 unrolled taps spilled 5 KB per thread on sm_90
        for dj in range(K):
            if BACKWARD:  # the flipped kernel: output token t received x[t'] * w[tap] from t' = t - tap + pad
                idx, ok = _neighbours(rows, cols, K // 2 - di, K // 2 - dj, height, width, tok_ok)
                xv = _load_rows(x_base, keep_base, idx, ok, chan_ok, sxn, skn, False)  # (BN, BC)
            else:
                idx, ok = _neighbours(rows, cols, di - K // 2, dj - K // 2, height, width, tok_ok)
                xv = _load_rows(x_base, keep_base, idx, ok, chan_ok, sxn, skn, HAS_KEEP)  # (BN, BC)
            wv = tl.load(w_ptr + (di * K + dj) * C + chans, mask=chan_ok, other=0.0).to(tl.float32)  # (BC,)
            acc += xv * wv[None, :]
    mask = tok_ok[:, None] & chan_ok[None, :]  # (BN, BC)
    if BACKWARD and HAS_KEEP:  # the gradient of v * keep w.r.t. v
        keep = tl.load(keep_base + toks.to(tl.int64) * skn, mask=tok_ok, other=0) != 0
        acc = tl.where(keep[:, None], acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_offs = b * srb + toks.to(tl.int64)[:, None] * srn + chans.to(tl.int64)[None, :] * src
        acc += tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    out_offs = (b * N + toks.to(tl.int64))[:, None] * C + chans[None, :]  # contiguous (B, N, C)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwc_bwd_weight(
    v_ptr, keep_ptr, g_ptr, part_ptr,
    N, C, height, width,
    svb, svn, svc, skb, skn, sgb, sgn, sgc,
    K: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partials ``(B, tiles, k*k + 1, C)`` fp32: per tap ``sum_tokens g * (v * keep)[token + tap - pad]``, then
    ``sum_tokens g`` (the bias row), over this program's ``BLOCK_N`` tokens."""
    b, toks, chans, tok_ok, chan_ok = row_channel_tile(N, C, BLOCK_N, BLOCK_C)  # (BN,), (BC,)
    rows = toks // width
    cols = toks % width
    g_offs = b * sgb + toks.to(tl.int64)[:, None] * sgn + chans.to(tl.int64)[None, :] * sgc
    g = tl.load(g_ptr + g_offs, mask=tok_ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)  # (BN, BC)
    v_base = v_ptr + b * svb + chans.to(tl.int64)[None, :] * svc  # (1, BC)
    keep_base = keep_ptr + b * skb
    part_base = part_ptr + ((b * tl.num_programs(0) + tl.program_id(0)) * (K * K + 1)) * C + chans  # (BC,)
    for di in range(K):  # loops, not unrolled: 25 unrolled taps spilled 5 KB per thread on sm_90
        for dj in range(K):
            idx, ok = _neighbours(rows, cols, di - K // 2, dj - K // 2, height, width, tok_ok)
            vv = _load_rows(v_base, keep_base, idx, ok, chan_ok, svn, skn, HAS_KEEP)  # (BN, BC)
            tl.store(part_base + (di * K + dj) * C, tl.sum(vv * g, axis=0), mask=chan_ok)
    tl.store(part_base + (K * K) * C, tl.sum(g, axis=0), mask=chan_ok)


def _keep_args(keep: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The keep-mask as bytes (read in place) and its strides; ``like`` stands in for the pointer without one."""
    if keep is None:
        return like, 0, 0
    keep = keep.view(torch.uint8)  # (B, N), bool storage read as bytes
    return keep, keep.stride(0), keep.stride(1)


class _TokenDWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, weight, bias, keep, residual, grid, block_n, block_c):
        batch, n_tokens, channels = v.shape
        k = weight.shape[-1]
        w_taps = weight.detach().reshape(channels, k * k).t().contiguous()  # (k*k, C): coalesced per tap
        out_dtype = v.dtype if residual is None else torch.promote_types(v.dtype, residual.dtype)
        out = torch.empty((batch, n_tokens, channels), dtype=out_dtype, device=v.device)  # (B, N, C)
        keep_t, skb, skn = _keep_args(keep, v)
        res_strides = residual.stride() if residual is not None else (0, 0, 0)
        if out.numel():
            launch = (triton.cdiv(n_tokens, block_n), triton.cdiv(channels, block_c), batch)
            _dwc_tokens[launch](
                v, keep_t, w_taps, bias if bias is not None else w_taps, residual if residual is not None else v, out,
                n_tokens, channels, grid[0], grid[1],
                *v.stride(), skb, skn, *res_strides,
                K=k, BACKWARD=False, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_C=block_c,
            )  # fmt: skip
        ctx.save_for_backward(v, keep, w_taps)
        ctx.meta = (grid, k, block_n, block_c, weight.dtype, None if bias is None else bias.dtype)
        ctx.res_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        v, keep, w_taps = ctx.saved_tensors
        grid, k, block_n, block_c, w_dtype, b_dtype = ctx.meta
        need_v, need_w, need_b, _, need_res = ctx.needs_input_grad[:5]
        batch, n_tokens, channels = v.shape
        keep_t, skb, skn = _keep_args(keep, v)
        tiles = triton.cdiv(n_tokens, block_n)
        dv = dw = db = dres = None
        if need_v:
            dv = torch.empty((batch, n_tokens, channels), dtype=v.dtype, device=v.device)  # (B, N, C)
            if dv.numel():
                _dwc_tokens[(tiles, triton.cdiv(channels, block_c), batch)](
                    grad_out, keep_t, w_taps, w_taps, grad_out, dv,
                    n_tokens, channels, grid[0], grid[1],
                    *grad_out.stride(), skb, skn, 0, 0, 0,
                    K=k, BACKWARD=True, HAS_KEEP=keep is not None, HAS_BIAS=False, HAS_RES=False,
                    BLOCK_N=block_n, BLOCK_C=block_c,
                )  # fmt: skip
        if need_w or need_b:
            # longer, narrower tiles for the reduction: 4x fewer partial rows, no spill (116 registers at 64 x 32)
            w_block_n, w_block_c = block_n * 4, max(block_c // 2, 1)
            w_tiles = triton.cdiv(n_tokens, w_block_n)
            partials = torch.zeros((batch, w_tiles, k * k + 1, channels), dtype=torch.float32, device=v.device)
            if partials.numel():
                _dwc_bwd_weight[(w_tiles, triton.cdiv(channels, w_block_c), batch)](
                    v, keep_t, grad_out, partials,
                    n_tokens, channels, grid[0], grid[1],
                    *v.stride(), skb, skn, *grad_out.stride(),
                    K=k, HAS_KEEP=keep is not None, BLOCK_N=w_block_n, BLOCK_C=w_block_c,
                )  # fmt: skip
            sums = partials.sum(dim=(0, 1))  # (k*k + 1, C)
            if need_w:
                dw = sums[: k * k].t().reshape(channels, 1, k, k).to(w_dtype)  # (C, 1, k, k)
            if need_b:
                db = sums[k * k].to(b_dtype)  # (C,)
        if need_res:
            dres = grad_out.to(ctx.res_dtype)  # (B, N, C)
        return dv, dw, db, None, dres, None, None, None


def _check(v, grid, weight, bias, keep, residual, block_tokens, block_channels) -> None:
    if v.dim() != 3:
        raise ValueError(f"v must be (B, N, C), got shape {tuple(v.shape)}.")
    batch, n_tokens, channels = v.shape
    if n_tokens != grid[0] * grid[1]:
        raise ValueError(f"{n_tokens} tokens do not fill a {grid[0]}x{grid[1]} grid.")
    k = weight.shape[-1]
    if weight.shape != (channels, 1, k, k) or k % 2 == 0:
        raise ValueError(f"weight must be ({channels}, 1, k, k) with an odd k, got {tuple(weight.shape)}.")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}.")
    if keep is not None and (keep.shape != (batch, n_tokens) or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool ({batch}, {n_tokens}) mask, got {keep.dtype} {tuple(keep.shape)}.")
    if residual is not None and residual.shape != v.shape:
        raise ValueError(f"residual must be {tuple(v.shape)}, got {tuple(residual.shape)}.")
    for block in (block_tokens, block_channels):
        if block < 1 or block & (block - 1):
            raise ValueError(f"Block sizes must be powers of 2, got {block}.")


def triton_token_dwc(
    v: torch.Tensor,
    grid: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    block_tokens: int = 16,
    block_channels: int = 64,
) -> torch.Tensor:
    """``residual + dwc(v * keep)`` on the token grid, differentiably, with Triton, in the token layout.

    Exactly ``residual + grid_to_tokens(F.conv2d(tokens_to_grid(v * keep[..., None], grid), weight, bias,
    padding=k // 2, groups=C))`` (LiT's value convolution, ``DiTAttention.dwc``), with zero padding at the borders.

    Args:
        v: (B, h*w, C) row-major tokens, any strides (read in place), on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        grid: (h, w), any sizes (odd, non-square, smaller than ``k``).
        weight: (C, 1, k, k) depthwise weight, odd ``k``; any float dtype (read as fp32).
        bias: (C,) or None.
        keep: (B, h*w) bool or None: dropped tokens count as zeros for their neighbours (and get no gradient).
        residual: (B, h*w, C) or None, any strides: added to the convolution (its gradient is the output's).
        block_tokens: tokens per program, a power of 2 (16 x 64 channels: 72-85 registers on sm_90, where 64 x 64
            needed all 255); the weight gradient's reduction takes 4x the tokens and half the channels.
        block_channels: channels per program, a power of 2.

    Returns:
        (B, h*w, C), contiguous, in ``v``'s dtype (promoted with ``residual``'s), accumulated in fp32;
        differentiable w.r.t. ``v``, ``weight``, ``bias`` and ``residual``.
    """
    _check(v, grid, weight, bias, keep, residual, block_tokens, block_channels)
    grid = (int(grid[0]), int(grid[1]))
    return _TokenDWC.apply(v, weight, bias, keep, residual, grid, block_tokens, block_channels)
