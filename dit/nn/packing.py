"""Images of different sizes as one padded token sequence (FiT): patchify, pack, unpack, per-token positions.

A batch of latents of different sizes arrives as one canvas ``(B, C, H, W)``, each sample zero-padded at the
bottom/right, with its own size. Each sample's valid region is cut into ``p x p`` patches in row-major order and
becomes the first ``h * w`` tokens of its row of a ``(B, L, p*p*C)`` sequence, ``L`` fixed by the canvas (its token
count, or the model's ``max_tokens`` when that is smaller); the rest of the row is padding. :class:`TokenLayout` records where every token came from, its ``(row, col)``
position and whether it is real, so the model can build key masks and rotary tables and write the output back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import gather_tokens, scatter_tokens


@dataclass(frozen=True)
class TokenLayout:
    """Where every token of a padded batch sits.

    Every field is built from tensor ops on the tokens' device and from static shapes: no read on the host, and the
    sequence length depends on the canvas (and ``max_tokens``), not on the samples, so a compiled graph or a cuDNN
    plan is reused across batches.

    Args:
        sizes: (B, 2) grid (h, w) of each sample, in patches, on the tokens' device.
        grid: (h, w) of the padded canvas, in patches.
        positions: (B, L, 2) (row, col) of each token; (0, 0) at padding.
        keep: (B, L) True at real tokens.
        index: (B, L) row-major canvas index of each token; ``h * w`` of the canvas (a slot past the end) at padding.
        padded: whether attention needs a key mask (the samples were given their own sizes).
    """

    sizes: torch.Tensor
    grid: tuple[int, int]
    positions: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor
    padded: bool = True


def token_layout(
    sizes: torch.Tensor,
    grid: tuple[int, int],
    device: torch.device | str | None = None,
    length: int | None = None,
    padded: bool = True,
) -> TokenLayout:
    """The layout of samples with grids ``sizes`` (B, 2) (h, w, in patches) on a canvas ``grid`` (h, w).

    ``length`` is the tokens per row (default: the canvas's ``h * w``); it must hold every sample's ``h * w``, which
    is not checked here (that would read ``sizes`` on the host). ``sizes`` are moved without a blocking copy.
    """
    device = sizes.device if device is None else torch.device(device)
    sizes = sizes.to(device, torch.long, non_blocking=True)  # (B, 2)
    length = grid[0] * grid[1] if length is None else length
    slots = torch.arange(length, device=device)[None]  # (1, L)
    height, width = sizes[:, 0:1], sizes[:, 1:2]  # (B, 1) each
    keep = slots < height * width  # (B, L)
    rows = torch.where(keep, slots // width, 0)  # (B, L)
    cols = torch.where(keep, slots % width, 0)  # (B, L)
    index = torch.where(keep, rows * grid[1] + cols, grid[0] * grid[1])  # (B, L)
    return TokenLayout(sizes, grid, torch.stack([rows, cols], dim=-1), keep, index, padded)


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, p*p*C)`` row-major patches, each flattened as (p, p, C)."""
    batch, channels, height, width = latents.shape
    p = patch_size
    x = latents.reshape(batch, channels, height // p, p, width // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``(B, h*w, p*p*C)`` -> ``(B, C, h*p, w*p)``, the inverse of :func:`patchify`."""
    (height, width), p, batch = grid, patch_size, tokens.shape[0]
    x = tokens.reshape(batch, height, width, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(batch, -1, height * p, width * p)


def pack(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Canvas tokens ``(B, h*w, F)`` -> each sample's valid tokens first, zero padding after: ``(B, L, F)``."""
    index = torch.where(layout.keep, layout.index, 0)  # (B, L): padding reads slot 0, then is zeroed
    return gather_tokens(tokens, index) * layout.keep[..., None].to(tokens.dtype)


def unpack(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, L, F)`` -> canvas tokens ``(B, h*w, F)``: real tokens at their place, zeros everywhere else.

    Padding is written to one slot past the canvas, which is cut off, so it never reaches the output.
    """
    slots = layout.grid[0] * layout.grid[1]
    return scatter_tokens(tokens, layout.index, slots + 1)[:, :slots]  # (B, h*w, F)
