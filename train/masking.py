"""Token masking as a training wrapper (MicroDiT): which tokens a step keeps, and where its loss counts."""

from __future__ import annotations

import inspect

import torch

from dit.nn.masking import keep_indices_from_scores, kept_count, patch_loss_mask, patch_scores

from .config import ConfigError, MaskingConfig


class TokenMasking:
    """Per-sample random masking of patch tokens for the steps before the unmasked fine-tune.

    The loop gives each sample a (H, W) grid of uniform draws from its own generator (so masks, like noise, do not
    depend on the process count or on resuming); :meth:`draw` turns them into the model's ``keep_indices`` and the
    objective's ``loss_mask`` (1 on the latent pixels of kept patches).

    Args:
        config: ``masking`` section (ratio, unmasked fine-tune steps).
        patch_size: the model's patch side in latent pixels.
        max_steps: the run's optimizer steps; the last ``config.unmasked_steps`` of them are unmasked.
    """

    def __init__(self, config: MaskingConfig, patch_size: int, max_steps: int):
        if not 0.0 <= config.ratio < 1.0:
            raise ConfigError(f"masking.ratio must be in [0, 1), got {config.ratio}.")
        if not 0 <= config.unmasked_steps <= max_steps:
            raise ConfigError(
                f"masking.unmasked_steps must be in [0, max_steps={max_steps}], got {config.unmasked_steps}."
            )
        self.config, self.patch_size, self.max_steps = config, patch_size, max_steps

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is masked."""
        return self.config.ratio > 0 and step < self.max_steps - self.config.unmasked_steps

    def draw(self, pixel_uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W) uniforms -> ``keep_indices`` (B, K) and ``loss_mask`` (B, 1, H, W)."""
        p = self.patch_size
        grid = (pixel_uniform.shape[1] // p, pixel_uniform.shape[2] // p)
        scores = patch_scores(pixel_uniform, p)  # (B, N)
        keep = keep_indices_from_scores(scores, kept_count(scores.shape[1], self.config.ratio))  # (B, K)
        return keep, patch_loss_mask(keep, grid, p)


def build_masking(config, model: torch.nn.Module, objective) -> TokenMasking | None:
    """The run's :class:`TokenMasking`, or None when ``masking.ratio`` is 0; refuses models and objectives that
    cannot mask."""
    if not config.masking.enabled:
        return None
    if "keep_indices" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"masking.ratio > 0 needs a backbone that takes keep_indices; {type(model).__name__} does not."
        )
    if any(getattr(block.attn1, "needs_grid", False) for block in getattr(model, "transformer_blocks", [])):
        raise ConfigError(
            "masking.ratio > 0 drops tokens from the grid, but this model's self-attention needs the full grid (KV "
            "compression or LiT's value convolution: set attention_conv_kernel_size to null)."
        )
    if not objective.supports_loss_mask:
        raise ConfigError("masking.ratio > 0 does not combine with consistency (LCM) distillation; set it to 0.")
    if config.controlnet.enabled:
        raise ConfigError("masking.ratio > 0 does not combine with ControlNet training; set it to 0.")
    return TokenMasking(config.masking, model.config.patch_size, config.max_steps)
