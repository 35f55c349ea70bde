"""Classifier-free guidance of a prediction, on every latent channel or on the first few (FiT guides 3 of 4)."""

from __future__ import annotations

import torch


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, guidance_channels: int | None = None
) -> torch.Tensor:
    """``uncond + guidance_scale * (cond - uncond)`` over (B, C, H, W) predictions.

    ``guidance_channels=k`` guides channels ``0..k-1`` only and keeps the conditional prediction on the others, as
    FiT's and DiT's ``forward_with_cfg`` do with ``k = 3``; None guides every channel.
    """
    if guidance_channels is None or guidance_channels >= cond.shape[1]:
        return uncond + guidance_scale * (cond - uncond)
    if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int) or guidance_channels < 1:
        raise ValueError(f"guidance_channels must be None or an int >= 1, got {guidance_channels!r}.")
    k = guidance_channels
    guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])  # (B, k, H, W)
    return torch.cat([guided, cond[:, k:]], dim=1)  # (B, C, H, W)
