"""Text padding trimmed to a few fixed lengths, on the host, before the backbone runs.

T5 captions are padded to the tokenizer's length (120 for PixArt-α, 300 for Σ) and most of it is padding. The
backbones never read a mask on the host (that would stall the GPU queue and break ``torch.compile`` graphs), so
the padding is cut where the mask is still host data: in the pipeline once per call and in the trainer's collate.
The kept length is rounded up to a multiple of :data:`TEXT_LENGTH_MULTIPLE` (capped at the padded length), so the
key lengths that reach attention come from a small fixed set (64, 128, 192, 256, 300 for Σ): kernels (cuDNN
plans, compiled graphs) are built once per length, not once per batch. Exact: every dropped key has zero weight.
"""

from __future__ import annotations

import torch

#: Trimmed text lengths are multiples of this (or the full padded length).
TEXT_LENGTH_MULTIPLE = 64


def text_length_buckets(max_length: int, multiple: int = TEXT_LENGTH_MULTIPLE) -> list[int]:
    """Every length :func:`trimmed_text_length` can return for captions padded to ``max_length``."""
    return sorted({*range(multiple, max_length, multiple), max_length})


def trimmed_text_length(mask: torch.Tensor, multiple: int = TEXT_LENGTH_MULTIPLE) -> int:
    """The text length to keep for a keep-mask ``mask`` (B, L): the last kept position of any sample, rounded up
    to ``multiple`` and capped at ``L``. Reads ``mask`` on the host (one read per call; keep it out of loops).

    A sample with no kept token attends uniformly to all ``L`` keys under PixArt's finite bias, so such a batch
    keeps its full length and the result stays identical.
    """
    if mask.ndim != 2:
        raise ValueError(f"A text mask must be (batch, tokens), got shape {tuple(mask.shape)}.")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    keep = mask.detach().to("cpu", torch.bool)  # (B, L)
    full = keep.shape[1]
    if keep.numel() == 0 or not bool(keep.any(dim=1).all()):
        return full
    positions = torch.arange(1, full + 1)  # (L,)
    last = int((keep * positions).amax())
    return min(full, -(-last // multiple) * multiple)


def trim_text_padding(
    embeds: torch.Tensor, mask: torch.Tensor | None, multiple: int = TEXT_LENGTH_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``embeds`` (B, L, C) and their keep-mask (B, L) cut to :func:`trimmed_text_length` tokens.

    A mask of batch 1 is shared by every sample (PixArt-δ's CFG batch passes one), as attention broadcasts it. A
    missing mask (every token kept) or a 3-D additive bias is returned unchanged.
    """
    if mask is None or mask.ndim != 2:
        return embeds, mask
    batch, length = embeds.shape[:2]
    if mask.shape[0] not in (1, batch) or mask.shape[1] != length:
        raise ValueError(
            f"The text mask has shape {tuple(mask.shape)}; expected ({batch}, {length}) or (1, {length})."
        )
    length = trimmed_text_length(mask, multiple)
    return embeds[:, :length], mask[:, :length]
