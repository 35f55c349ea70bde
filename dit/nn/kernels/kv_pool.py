"""Triton KV-compression pooling: :class:`dit.nn.attention.kv_compress.KVCompress` before its norm, fused.

Tokens ``(B, h*w, C)`` lie row-major on an ``(h, w)`` grid. Each output cell pools an ``r x r`` block of that grid:
``conv`` (depthwise, weight ``(C, 1, r, r)``, optional bias ``(C,)``), ``avg`` (mean) or ``uniform`` / ``ave`` (the
cell's top-left token). ``padding="replicate"`` pads the grid on the bottom/right to multiples of ``r`` by repeating
its last row/column (``ceil(h/r) x ceil(w/r)`` cells), ``"none"`` drops the remainder (``floor``). The kernels read
the token layout directly (any strides, no NCHW round trip) and write contiguous ``(B, h'*w', C)`` cells, the layout
attention reads. One program handles ``BLOCK_L`` cells (or tokens, in the backward) x ``BLOCK_C`` channels of one
batch element, accumulating in fp32.

Backward: the tokens' gradient is one Triton kernel over token tiles (each token gathers its cell's output gradient
times the sum of the kernel taps that read it: one tap inside the grid, several on the replicated last row/column);
the conv weight and bias gradients are one Triton kernel over cell tiles writing per-program partial sums, reduced
with ``torch.sum`` (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import row_channel_tile

#: Mode names -> kernel mode ids: 0 depthwise conv, 1 mean, 2 top-left token (``uniform`` and ``ave`` alike).
_MODE_IDS = {"conv": 0, "avg": 1, "uniform": 2, "ave": 2}
_PADDINGS = ("replicate", "none")


@triton.jit
def _tap_offsets(top, left, di: tl.constexpr, dj: tl.constexpr, height, width, REPLICATE: tl.constexpr):
    """Token index of tap ``(di, dj)`` of cells whose top-left grid position is ``(top, left)`` (clamped if padded)."""
    row = top + di
    col = left + dj
    if REPLICATE:
        row = tl.minimum(row, height - 1)
        col = tl.minimum(col, width - 1)
    return (row * width + col).to(tl.int64)


@triton.jit
def _kv_pool_fwd(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    L, C, height, width, cells_w,
    sxb, sxn, sxc,
    RATIO: tl.constexpr, MODE: tl.constexpr, REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, cells, chans, cell_ok, chan_ok = row_channel_tile(L, C, BLOCK_L, BLOCK_C)  # (BL,), (BC,)
    mask = cell_ok[:, None] & chan_ok[None, :]  # (BL, BC)
    top = (cells // cells_w) * RATIO
    left = (cells % cells_w) * RATIO
    x_base = x_ptr + b * sxb + chans.to(tl.int64)[None, :] * sxc  # (1, BC)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    if MODE == 2:  # the top-left token is always inside the grid (top < h, left < w)
        tok = _tap_offsets(top, left, 0, 0, height, width, False)
        acc += tl.load(x_base + tok[:, None] * sxn, mask=mask, other=0.0).to(tl.float32)
    else:
        for di in tl.static_range(RATIO):
            for dj in tl.static_range(RATIO):
                tok = _tap_offsets(top, left, di, dj, height, width, REPLICATE)
                xv = tl.load(x_base + tok[:, None] * sxn, mask=mask, other=0.0).to(tl.float32)  # (BL, BC)
                if MODE == 0:
                    wv = tl.load(w_ptr + chans * (RATIO * RATIO) + (di * RATIO + dj), mask=chan_ok, other=0.0)
                    acc += xv * wv.to(tl.float32)[None, :]
                else:
                    acc += xv
        if MODE == 1:
            acc = acc / (RATIO * RATIO)
        if MODE == 0 and HAS_BIAS:
            acc += tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    y_offs = (b * L + cells.to(tl.int64))[:, None] * C + chans[None, :]  # contiguous (B, L, C)
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_pool_bwd_tokens(
    g_ptr, w_ptr, dx_ptr,
    N, C, height, width, cells_h, cells_w,
    sgb, sgl, sgc,
    RATIO: tl.constexpr, MODE: tl.constexpr, REPLICATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, toks, chans, tok_ok, chan_ok = row_channel_tile(N, C, BLOCK_N, BLOCK_C)  # (BN,), (BC,)
    row = toks // width
    col = toks % width
    di = row % RATIO  # the token's tap inside its cell
    dj = col % RATIO
    cell_row = row // RATIO
    cell_col = col // RATIO
    inside = tok_ok & (cell_row < cells_h) & (cell_col < cells_w)  # False on rows/cols dropped by padding "none"
    cell = (cell_row * cells_w + cell_col).to(tl.int64)
    g_offs = b * sgb + cell[:, None] * sgl + chans.to(tl.int64)[None, :] * sgc
    g = tl.load(g_ptr + g_offs, mask=inside[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)  # (BN, BC)
    # The last row (column) also stands for the replicated padding below (right of) it: taps di..r-1 read it.
    if REPLICATE:
        bottom = row == height - 1  # (BN,)
        right = col == width - 1
    else:
        bottom = row < 0  # all False
        right = col < 0
    if MODE == 0:
        taps = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)  # sum of the weights of the taps reading each token
        for ki in tl.static_range(RATIO):
            row_sel = (di == ki) | (bottom & (di < ki))  # (BN,)
            for kj in tl.static_range(RATIO):
                sel = row_sel & ((dj == kj) | (right & (dj < kj)))  # (BN,)
                wv = tl.load(w_ptr + chans * (RATIO * RATIO) + (ki * RATIO + kj), mask=chan_ok, other=0.0)
                taps += tl.where(sel[:, None], wv.to(tl.float32)[None, :], 0.0)
        dx = g * taps
    elif MODE == 1:
        rows = tl.where(bottom, RATIO - di, 1)  # (BN,) taps reading the token along each side
        cols = tl.where(right, RATIO - dj, 1)
        dx = g * ((rows * cols).to(tl.float32) / (RATIO * RATIO))[:, None]
    else:
        dx = tl.where(((di == 0) & (dj == 0))[:, None], g, 0.0)
    dx_offs = (b * N + toks.to(tl.int64))[:, None] * C + chans[None, :]  # contiguous (B, N, C)
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=tok_ok[:, None] & chan_ok[None, :])


@triton.jit
def _kv_pool_bwd_weight(
    x_ptr, g_ptr, part_ptr,
    L, C, height, width, cells_w,
    sxb, sxn, sxc, sgb, sgl, sgc,
    RATIO: tl.constexpr, REPLICATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, cells, chans, cell_ok, chan_ok = row_channel_tile(L, C, BLOCK_L, BLOCK_C)  # (BL,), (BC,)
    mask = cell_ok[:, None] & chan_ok[None, :]  # (BL, BC)
    top = (cells // cells_w) * RATIO
    left = (cells % cells_w) * RATIO
    g_offs = b * sgb + cells.to(tl.int64)[:, None] * sgl + chans.to(tl.int64)[None, :] * sgc
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)  # (BL, BC)
    x_base = x_ptr + b * sxb + chans.to(tl.int64)[None, :] * sxc
    # partials (B, tiles, r*r + 1, C): one row per tap, then the bias row
    part_base = part_ptr + ((b * tl.num_programs(0) + tl.program_id(0)) * (RATIO * RATIO + 1)) * C + chans
    for di in tl.static_range(RATIO):
        for dj in tl.static_range(RATIO):
            tok = _tap_offsets(top, left, di, dj, height, width, REPLICATE)
            xv = tl.load(x_base + tok[:, None] * sxn, mask=mask, other=0.0).to(tl.float32)  # (BL, BC)
            tl.store(part_base + (di * RATIO + dj) * C, tl.sum(xv * g, axis=0), mask=chan_ok)
    tl.store(part_base + (RATIO * RATIO) * C, tl.sum(g, axis=0), mask=chan_ok)


def pooled_grid(grid: tuple[int, int], ratio: int, padding: str) -> tuple[int, int]:
    """Cells ``(h', w')`` of an ``(h, w)`` grid pooled by ``ratio``: ceil (``replicate``) or floor (``none``)."""
    height, width = grid
    if padding == "replicate":
        return -(-height // ratio), -(-width // ratio)
    return height // ratio, width // ratio


class _KVPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, weight, bias, grid, ratio, mode_id, replicate, block_l, block_c):
        batch, n_tokens, channels = tokens.shape
        height, width = grid
        cells_h, cells_w = pooled_grid(grid, ratio, "replicate" if replicate else "none")
        n_cells = cells_h * cells_w
        y = torch.empty((batch, n_cells, channels), dtype=tokens.dtype, device=tokens.device)  # (B, L', C)
        w_flat = weight.reshape(channels, ratio * ratio).contiguous() if weight is not None else tokens  # (C, r*r)
        ctx.save_for_backward(tokens, w_flat if weight is not None else None)
        params = [(p.shape, p.dtype) if p is not None else None for p in (weight, bias)]  # for the grads
        ctx.meta = (grid, ratio, mode_id, replicate, block_l, block_c, cells_h, cells_w, *params)
        if n_cells == 0:
            return y
        launch = (triton.cdiv(n_cells, block_l), triton.cdiv(channels, block_c), batch)
        _kv_pool_fwd[launch](
            tokens, w_flat, bias if bias is not None else tokens, y,
            n_cells, channels, height, width, cells_w,
            *tokens.stride(),
            RATIO=ratio, MODE=mode_id, REPLICATE=replicate, HAS_BIAS=bias is not None,
            BLOCK_L=block_l, BLOCK_C=block_c,
        )  # fmt: skip
        return y

    @staticmethod
    def backward(ctx, grad_y):
        tokens, w_flat = ctx.saved_tensors
        grid, ratio, mode_id, replicate, block_l, block_c, cells_h, cells_w, w_meta, b_meta = ctx.meta
        batch, n_tokens, channels = tokens.shape
        height, width = grid
        n_cells = cells_h * cells_w
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = torch.empty((batch, n_tokens, channels), dtype=tokens.dtype, device=tokens.device)  # (B, N, C)
            if n_cells == 0:
                dx.zero_()
            else:
                launch = (triton.cdiv(n_tokens, block_l), triton.cdiv(channels, block_c), batch)
                _kv_pool_bwd_tokens[launch](
                    grad_y, w_flat if w_flat is not None else tokens, dx,
                    n_tokens, channels, height, width, cells_h, cells_w,
                    *grad_y.stride(),
                    RATIO=ratio, MODE=mode_id, REPLICATE=replicate, BLOCK_N=block_l, BLOCK_C=block_c,
                )  # fmt: skip
        if need_w or need_b:
            tiles = triton.cdiv(n_cells, block_l)
            partials = torch.zeros(
                (batch, tiles, ratio * ratio + 1, channels), dtype=torch.float32, device=tokens.device
            )
            if n_cells:
                _kv_pool_bwd_weight[(tiles, triton.cdiv(channels, block_c), batch)](
                    tokens, grad_y, partials,
                    n_cells, channels, height, width, cells_w,
                    *tokens.stride(), *grad_y.stride(),
                    RATIO=ratio, REPLICATE=replicate, BLOCK_L=block_l, BLOCK_C=block_c,
                )  # fmt: skip
            sums = partials.sum(dim=(0, 1))  # (r*r + 1, C)
            if need_w:
                dw = sums[: ratio * ratio].t().reshape(w_meta[0]).to(w_meta[1])  # (C, 1, r, r)
            if need_b:
                db = sums[ratio * ratio].to(b_meta[1])  # (C,)
        return dx, dw, db, None, None, None, None, None, None


def _check(tokens, grid, ratio, mode, padding, weight, block_cells, block_channels) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens.shape)}.")
    if mode not in _MODE_IDS:
        raise ValueError(f"Unknown kv_compress_mode {mode!r}; choose one of {sorted(_MODE_IDS)}.")
    if padding not in _PADDINGS:
        raise ValueError(f"Unknown kv_compress_padding {padding!r}; choose one of {sorted(_PADDINGS)}.")
    if ratio < 2:
        raise ValueError(f"kv_compress_ratio must be >= 2, got {ratio}.")
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} grid.")
    if mode == "conv" and (weight is None or weight.numel() != tokens.shape[2] * ratio * ratio):
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"conv mode needs a ({tokens.shape[2]}, 1, {ratio}, {ratio}) weight, got {shape}.")
    for block in (block_cells, block_channels):
        if block < 1 or block & (block - 1):
            raise ValueError(f"Block sizes must be powers of 2, got {block}.")
    cells = pooled_grid(grid, ratio, padding)
    if cells[0] * cells[1] == 0 and mode != "uniform":  # as the torch ops: conv, avg_pool2d, interpolate raise
        raise RuntimeError(f"A {grid[0]}x{grid[1]} grid has no {ratio}x{ratio} cell without padding.")


def triton_kv_pool(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    ratio: int,
    mode: str,
    padding: str,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    block_cells: int = 32,
    block_channels: int = 64,
) -> torch.Tensor:
    """Pool ``tokens`` (B, h*w, C) on ``grid`` (h, w) into (B, h'*w', C) cells, differentiably, with Triton.

    Exactly ``KVCompress`` before its norm: ``grid_to_tokens(MODES[mode](module, PADDINGS[padding](
    tokens_to_grid(tokens, grid), ratio)))``, with ``h' = ceil(h/r)`` (``replicate``) or ``floor(h/r)`` (``none``).
    Without any cell (``none`` and a side < ratio) ``uniform`` returns ``(B, 0, C)`` and the other modes raise
    ``RuntimeError``, as the torch ops do.

    Args:
        tokens: (B, h*w, C) row-major tokens, any strides (read in place), on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        grid: (h, w).
        ratio: cell side (>= 2).
        mode: ``conv``, ``avg``, ``uniform`` or ``ave``.
        padding: ``replicate`` or ``none``.
        weight: ``conv`` only: the depthwise weight (C, 1, r, r) (``KVCompress.conv.weight``).
        bias: ``conv`` only, optional: (C,).
        block_cells: cells (tokens in the backward) per program, a power of 2.
        block_channels: channels per program, a power of 2.

    Returns:
        (B, h'*w', C), contiguous, in ``tokens``' dtype (accumulated in fp32); differentiable w.r.t. ``tokens``,
        ``weight`` and ``bias``.
    """
    _check(tokens, grid, ratio, mode, padding, weight, block_cells, block_channels)
    if mode != "conv":
        weight = bias = None
    grid = (int(grid[0]), int(grid[1]))
    return _KVPool.apply(
        tokens, weight, bias, grid, int(ratio), _MODE_IDS[mode], padding == "replicate", block_cells, block_channels
    )
