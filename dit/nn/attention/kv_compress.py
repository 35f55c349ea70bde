"""Spatial key/value compression (PixArt-Σ): keys and values on a ``ratio``-times coarser grid, queries untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import use_kernels
from .ops import grid_to_tokens, tokens_to_grid


def _pad_to_multiple(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Replicate-pad a ``(B, C, h, w)`` grid on the bottom/right so both sides divide by ``ratio`` (odd grids)."""
    pad_h, pad_w = -x.shape[-2] % ratio, -x.shape[-1] % ratio
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def _crop_to_multiple(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Drop the bottom rows / right columns of a ``(B, C, h, w)`` grid that do not fill a ``ratio`` cell."""
    return x[..., : x.shape[-2] // ratio * ratio, : x.shape[-1] // ratio * ratio]


#: How a grid whose sides do not divide by the ratio is made to: ``replicate`` pads (ceil(h/r) x ceil(w/r) cells,
#: every token is seen), ``none`` drops the remainder (floor(h/r) x floor(w/r) cells, as PixArt-Σ's original code).
PADDINGS = {"replicate": _pad_to_multiple, "none": _crop_to_multiple}


def _conv(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    return module.conv(x)  # (B, C, h/r, w/r)


def _avg(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, module.ratio)  # (B, C, h/r, w/r)


def _uniform(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    return x[..., :: module.ratio, :: module.ratio]  # (B, C, h/r, w/r)


def _ave(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    # PixArt-Σ's ``ave``: despite the name, nearest-neighbour resizing, i.e. the cells' top-left tokens
    return F.interpolate(x, scale_factor=1 / module.ratio, mode="nearest")  # (B, C, h/r, w/r)


#: How a mode reduces a ``(B, C, h, w)`` grid whose sides divide by the ratio (after :data:`PADDINGS`).
MODES = {"conv": _conv, "avg": _avg, "uniform": _uniform, "ave": _ave}


class KVCompress(nn.Module):
    """Reduce key or value tokens on their 2-D grid by ``ratio`` along each side; one instance serves K and V.

    Modes: ``conv`` (PixArt-Σ: depthwise conv with kernel = stride = ratio, initialised to averaging, then a
    LayerNorm; keys ``conv`` / ``norm``, converted from the original ``attn.sr`` / ``attn.norm``), ``avg``
    (average pooling), ``uniform`` (every ``ratio``-th token) and ``ave`` (PixArt-Σ's mode of that name:
    nearest-neighbour resizing, which keeps the same tokens as ``uniform``). Any h×w works. With ``padding``
    ``replicate`` (the default) sides that do not divide by the ratio are replicate-padded, so their last row or
    column is kept (the original ``uniform`` crashed there); ``none`` drops that remainder, as the original
    ``Conv2d(kernel=stride=ratio)`` and ``ave`` do. :meth:`forward_pair` compresses keys and values together: one
    pooling (one Triton launch) and one norm for both when they come from one fused projection.

    Args:
        dim: token width.
        ratio: spatial stride (2 halves each side: 4x fewer keys).
        mode: ``conv``, ``avg``, ``uniform`` or ``ave``.
        padding: ``replicate`` or ``none`` (see :data:`PADDINGS`).
    """

    def __init__(self, dim: int, ratio: int, mode: str = "conv", padding: str = "replicate"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Unknown kv_compress_mode {mode!r}; choose one of {sorted(MODES)}.")
        if padding not in PADDINGS:
            raise ValueError(f"Unknown kv_compress_padding {padding!r}; choose one of {sorted(PADDINGS)}.")
        if ratio < 2:
            raise ValueError(f"kv_compress_ratio must be >= 2, got {ratio}.")
        self.ratio, self.mode, self.padding = ratio, mode, padding
        self.norm = nn.Identity()  # parameter-free, so the pooling modes keep an empty state dict
        if mode == "conv":
            self.conv = nn.Conv2d(dim, dim, ratio, stride=ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.reset_to_average()

    @torch.no_grad()
    def reset_to_average(self) -> None:
        """PixArt-Σ's "Conv Avg Init": the conv starts as average pooling (weight 1/r², bias 0)."""
        self.conv.weight.fill_(1.0 / self.ratio**2)
        self.conv.bias.zero_()

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``tokens`` (B, h*w, C) on ``grid`` (h, w) -> (B, h'*w', C), h' = ceil(h/r) (``replicate``) or floor."""
        return self.norm(self._pool(tokens, grid))  # (B, h'*w', C)

    def forward_pair(
        self, keys: torch.Tensor, values: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress ``keys`` and ``values`` (B, h*w, C) together: ``(self(keys, grid), self(values, grid))``.

        Where they lie side by side in one storage (the key and value columns of a fused QKV or KV projection, see
        :func:`side_by_side`) both are read as one (B, h*w, 2C) view, without a copy: one pooling call (one Triton
        launch, or one torch conv / pool, the conv weight and bias repeated for the two halves; their gradients sum
        as the two calls' do) and one norm call. Otherwise, and under ``torch.compile`` (inductor fuses the two
        calls itself), the two calls. Returns (B, h'*w', C) x 2; on the joined path views of one tensor.
        """
        if torch.compiler.is_compiling() or not (side_by_side(keys, values) and self._weights_are_plain()):
            return self(keys, grid), self(values, grid)
        joined = _JoinSideBySide.apply(keys, values)  # (B, h*w, 2C), a view: no copy
        pooled = self._pool(joined, grid, copies=2)  # (B, h'*w', 2C)
        keys, values = self.norm(pooled.unflatten(-1, (2, -1))).unbind(-2)  # (B, h'*w', C) x 2: norm over C
        return keys, values

    def _weights_are_plain(self) -> bool:
        """Whether the conv is a plain ``nn.Conv2d`` whose weight :meth:`_pool` may repeat (not wrapped, e.g. by PEFT)."""
        return self.mode != "conv" or type(self.conv) is nn.Conv2d

    def _pool(self, tokens: torch.Tensor, grid: tuple[int, int], copies: int = 1) -> torch.Tensor:
        """The pooling before the norm: (B, h*w, copies * C) -> (B, h'*w', copies * C), the conv weight and bias
        repeated ``copies`` times along the channels (each block of C channels pooled as one ``forward`` pools)."""
        weight, bias = (self.conv.weight, self.conv.bias) if self.mode == "conv" else (None, None)
        if copies > 1 and weight is not None:
            weight = weight.repeat(copies, 1, 1, 1)  # (copies * C, 1, r, r): its backward sums the copies
            bias = None if bias is None else bias.repeat(copies)  # (copies * C,)
        batch_tokens = tokens.shape[0] * tokens.shape[1]
        if use_kernels(tokens, *self.parameters(), batch_tokens=batch_tokens):  # one Triton kernel, token layout
            from ..kernels.kv_pool import triton_kv_pool

            return triton_kv_pool(tokens, grid, self.ratio, self.mode, self.padding, weight, bias)  # (B, L', C)
        x = tokens_to_grid(tokens, grid)  # (B, C, h, w)
        if self.mode != "uniform" or self.padding != "replicate":  # uniform's top-left tokens lie inside: no pad
            x = PADDINGS[self.padding](x, self.ratio)  # (B, C, h'*r, w'*r)
        if copies > 1 and weight is not None:
            x = F.conv2d(x, weight, bias, stride=self.ratio, groups=x.shape[1])  # (B, C, h', w'): one depthwise conv
        else:
            x = MODES[self.mode](self, x)  # (B, C, h', w')
        return grid_to_tokens(x)  # (B, h'*w', C)


def side_by_side(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``values`` (B, N, C) start right after ``keys`` (B, N, C) in one storage, with the same strides and
    contiguous channels, so that one (B, N, 2C) strided view reads both without overlapping itself: the keys and
    values of one fused projection output (B, N, 3C) or (B, N, 2C) split along the channels."""
    if keys.dim() != 3 or keys.shape != values.shape or keys.stride() != values.stride():
        return False
    if keys.dtype != values.dtype or keys.device != values.device or keys.stride(-1) != 1:
        return False
    batch, tokens, channels = keys.shape
    if keys.untyped_storage().data_ptr() != values.untyped_storage().data_ptr():
        return False
    if values.storage_offset() != keys.storage_offset() + channels:
        return False
    token_stride, batch_stride = keys.stride(1), keys.stride(0)
    fits_tokens = tokens == 1 or token_stride >= 2 * channels  # a token's 2C channels end before the next token
    return fits_tokens and (batch == 1 or batch_stride >= (tokens - 1) * token_stride + 2 * channels)


class _JoinSideBySide(torch.autograd.Function):
    """Keys and values that are :func:`side_by_side` -> one (B, N, 2C) view of both (no copy); its gradient is split
    back into the two halves."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return keys.as_strided((*keys.shape[:-1], 2 * keys.shape[-1]), keys.stride())  # (B, N, 2C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad.chunk(2, dim=-1)  # (B, N, C) x 2
