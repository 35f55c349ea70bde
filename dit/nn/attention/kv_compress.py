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
    ``Conv2d(kernel=stride=ratio)`` and ``ave`` do.

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
        batch_tokens = tokens.shape[0] * tokens.shape[1]
        if use_kernels(tokens, *self.parameters(), batch_tokens=batch_tokens):  # one Triton kernel, token layout
            from ..kernels.kv_pool import triton_kv_pool

            weight, bias = (self.conv.weight, self.conv.bias) if self.mode == "conv" else (None, None)
            return self.norm(triton_kv_pool(tokens, grid, self.ratio, self.mode, self.padding, weight, bias))
        x = PADDINGS[self.padding](tokens_to_grid(tokens, grid), self.ratio)  # (B, C, h'*r, w'*r)
        return self.norm(grid_to_tokens(MODES[self.mode](self, x)))  # (B, h'*w', C)
