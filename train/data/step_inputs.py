"""What one training step feeds the networks besides the batch: per-sample random draws, substituted captions, and
the call of a network with the step's conditions, made without reading the device on the host."""

from __future__ import annotations

import torch
from torch import nn


def sample_draws(
    seed: int, micro_step: int, positions: list[int], latent_shape, device, token_mask: bool = False
) -> dict[str, torch.Tensor]:
    """Per-sample randomness from a generator keyed by (seed, micro-step, position in the global batch).

    Independent of the process count and of where a run was resumed, which makes both exact. ``token_mask`` adds
    ``mask``, an (H, W) grid of uniforms per sample for token masking (drawn last, so the other draws stay the same).
    """
    draws = {name: [] for name in ("noise", "eps", "uniform", "coin", "guidance", "mask")}
    for position in positions:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 65_537 + position)
        draws["noise"].append(torch.randn(latent_shape, generator=gen))
        draws["eps"].append(torch.randn(latent_shape, generator=gen))
        draws["uniform"].append(torch.rand((), generator=gen))
        draws["coin"].append(torch.rand((), generator=gen))
        draws["guidance"].append(torch.rand((), generator=gen))
        if token_mask:
            draws["mask"].append(torch.rand(latent_shape[-2:], generator=gen))
    return {name: torch.stack(values).to(device, non_blocking=True) for name, values in draws.items() if values}


def _to_device(caption: tuple | None, device: torch.device) -> tuple | None:
    """A ``(features, mask or None)`` caption on ``device`` (once, at setup: no step copies it)."""
    return None if caption is None else tuple(None if t is None else t.to(device) for t in caption)


def _with_caption(text, mask, caption, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``text``/``mask`` (B, L, C)/(B, L) with ``caption`` = (L0 >= L, C) features and an (L0,) mask or None (keep
    the prompt's mask) substituted where ``where`` (B,) is true. The batch's text was trimmed to ``L`` on the host
    (:func:`~dit.nn.text_padding.trim_text_padding`); the caption is cut to match, which is exact when its mask keeps
    no token past ``L`` (an empty caption keeps one) and, with no mask of its own, always."""
    null_text, null_mask = caption
    length = text.shape[1]
    text = torch.where(where[:, None, None], null_text[:length].to(text.dtype), text)
    if null_mask is not None:
        mask = torch.where(where[:, None], null_mask[:length].to(mask.dtype), mask)
    return text, mask


def call_network(
    network: nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    *,
    captions: dict[bool, tuple[torch.Tensor, torch.Tensor]],
    uncond: bool = False,
    guidance: torch.Tensor | None = None,
    **features,
) -> torch.Tensor:
    """``network``'s prediction for ``noisy`` at model time ``t`` with the step's text (``captions[uncond]``), a
    guidance-embedding student's guidance scale ``guidance`` (B,) and the features' keyword arguments (the
    student's only). The network computes its own micro-conditions and guidance embedding."""
    text, text_mask = captions[uncond]
    extra = {} if guidance is None else {"guidance": guidance}
    return network(noisy, text, t, encoder_attention_mask=text_mask, **extra, **features).sample
