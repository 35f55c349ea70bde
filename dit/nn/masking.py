"""Token masking for micro-budget training (MicroDiT): small pure ops on row-major patch tokens.

A training step keeps a random subset of each sample's patch tokens; the backbone runs on the kept tokens only, the
output head writes zeros at the dropped positions, and the loss averages over the kept patches only. Inference never
masks. Randomness comes from the caller (the training loop's per-sample draws), so these ops are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kept_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept per sample at ``mask_ratio`` (MicroDiT's ``int(N * (1 - ratio))``), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def keep_indices_from_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` lowest-scoring tokens of each sample, in ascending token order: (B, N) -> (B, keep) int64.

    With i.i.d. continuous scores every subset of size ``keep`` is equally likely (MAE-style random masking).
    """
    if not 0 < keep <= scores.shape[1]:
        raise ValueError(f"Cannot keep {keep} of {scores.shape[1]} tokens.")
    chosen = scores.argsort(dim=1)[:, :keep]  # (B, K)
    return chosen.sort(dim=1).values


def patch_scores(pixel_uniform: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-pixel uniform draws (B, H, W) -> one score per patch token (B, H/p * W/p), row-major.

    Each patch takes its top-left draw: i.i.d. uniforms per token, so the kept subset is uniformly random.
    """
    return pixel_uniform[:, ::patch_size, ::patch_size].flatten(1)  # (B, N)


def gather_tokens(tokens: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens -> (B, K, D), the kept ones."""
    index = keep_indices[:, :, None].expand(-1, -1, tokens.shape[-1])  # (B, K, D)
    return tokens.gather(1, index)


def scatter_tokens(kept: torch.Tensor, keep_indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K, D) kept tokens -> (B, N, D), zeros at the dropped positions (MicroDiT's zero ``mask_token``)."""
    out = kept.new_zeros(kept.shape[0], num_tokens, kept.shape[-1])  # (B, N, D)
    index = keep_indices[:, :, None].expand(-1, -1, kept.shape[-1])  # (B, K, D)
    return out.scatter(1, index, kept)


def patch_loss_mask(
    keep_indices: torch.Tensor, grid: tuple[int, int], patch_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """1 on the latent pixels of kept patches, 0 elsewhere: (B, K) -> (B, 1, h*p, w*p)."""
    height, width = grid
    keep = torch.zeros(keep_indices.shape[0], height * width, dtype=dtype, device=keep_indices.device)  # (B, N)
    keep.scatter_(1, keep_indices, 1.0)
    keep = keep.view(-1, 1, height, width)  # (B, 1, h, w)
    return F.interpolate(keep, scale_factor=patch_size, mode="nearest")  # (B, 1, H, W)
