"""What every token-layout kernel starts from: its tile of rows (tokens or pooled cells) x channels of one sample."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_channel_tile(n_rows, n_channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (row tile, channel tile, sample): the sample (int64), the tile's rows (BLOCK_R,) and channels
    (BLOCK_C,), and which of them exist."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, rows, chans, rows < n_rows, chans < n_channels
