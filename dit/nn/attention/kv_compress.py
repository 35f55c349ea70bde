"""Spatial key/value compression (PixArt-Σ): keys and values on a ``ratio``-times coarser grid, queries untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import grid_to_tokens, tokens_to_grid


def _pad_to_multiple(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Replicate-pad a ``(B, C, h, w)`` grid on the bottom/right so both sides divide by ``ratio`` (odd grids)."""
    pad_h, pad_w = -x.shape[-2] % ratio, -x.shape[-1] % ratio
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def _conv(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    return module.conv(_pad_to_multiple(x, module.ratio))  # (B, C, ceil(h/r), ceil(w/r))


def _avg(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    # ceil_mode: the last, partial window of an odd side averages the tokens it has
    return F.avg_pool2d(x, module.ratio, ceil_mode=True)


def _uniform(module: KVCompress, x: torch.Tensor) -> torch.Tensor:
    return x[..., :: module.ratio, :: module.ratio]  # ceil-sized; the grid is read from the result


#: How a mode reduces a ``(B, C, h, w)`` grid.
MODES = {"conv": _conv, "avg": _avg, "uniform": _uniform}


class KVCompress(nn.Module):
    """Reduce key or value tokens on their 2-D grid by ``ratio`` along each side; one instance serves K and V.

    Modes: ``conv`` (PixArt-Σ: depthwise conv with kernel = stride = ratio, initialised to averaging, then a
    LayerNorm; keys ``conv`` / ``norm``, converted from the original ``attn.sr`` / ``attn.norm``), ``avg``
    (average pooling) and ``uniform`` (every ``ratio``-th token). Any h×w works: odd sides keep their last row or
    column (the original ``uniform`` mode crashed there).

    Args:
        dim: token width.
        ratio: spatial stride (2 halves each side: 4x fewer keys).
        mode: ``conv``, ``avg`` or ``uniform``.
    """

    def __init__(self, dim: int, ratio: int, mode: str = "conv"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Unknown kv_compress_mode {mode!r}; choose one of {sorted(MODES)}.")
        if ratio < 2:
            raise ValueError(f"kv_compress_ratio must be >= 2, got {ratio}.")
        self.ratio, self.mode = ratio, mode
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
        """``tokens`` (B, h*w, C) on ``grid`` (h, w) -> (B, ceil(h/r)*ceil(w/r), C)."""
        return self.norm(grid_to_tokens(MODES[self.mode](self, tokens_to_grid(tokens, grid))))  # (B, N', C)
