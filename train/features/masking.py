"""Token masking as a training feature (MicroDiT): which tokens a step keeps, and where its loss counts."""

from __future__ import annotations

import torch
from torch import nn

from dit.models.capabilities import capability
from dit.nn.masking import keep_indices_from_scores, kept_count, patch_loss_mask, patch_scores

from ..config import ConfigError, MaskingConfig, TrainConfig
from .base import Contribution, Feature, StepInputs


class TokenMasking(Feature):
    """Per-sample random masking of patch tokens for the steps before the unmasked fine-tune.

    The loop gives each sample a (H, W) grid of uniform draws from its own generator (so masks, like noise, do not
    depend on the process count or on resuming); :meth:`draw` turns them into the model's ``keep_indices`` and the
    objective's ``loss_mask`` (1 on the latent pixels of kept patches).

    Args:
        config: ``masking`` section (ratio, unmasked fine-tune steps).
        patch_size: the model's patch side in latent pixels.
        max_steps: the run's optimizer steps; the last ``config.unmasked_steps`` of them are unmasked.
    """

    name = "masking"
    label = "masking.ratio > 0 (token masking)"
    off = "set masking.ratio to 0"
    excludes = frozenset({"controlnet", "mixed_sizes"})
    needs = {"supports_token_masking": "takes keep_indices"}

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

    @classmethod
    def from_config(cls, config: TrainConfig, backbone: nn.Module) -> TokenMasking | None:
        """The run's masking, or None when ``masking.ratio`` is 0."""
        if not config.masking.enabled:
            return None
        return cls(config.masking, backbone.config.patch_size, config.max_steps)

    def check(self, backbone: nn.Module) -> None:
        if capability(backbone, "needs_full_grid"):
            raise ConfigError(
                "masking.ratio > 0 drops tokens from the grid, but this model's self-attention needs the full grid "
                "(KV compression or LiT's value convolution: set attention_conv_kernel_size to null)."
            )

    def needs_token_draws(self, step: int) -> bool:
        return self.active(step)

    def contribute(self, inputs: StepInputs) -> Contribution:
        """A masked step: the student sees its kept tokens only, and the loss counts on them only."""
        if not self.active(inputs.step):
            return Contribution()
        keep_indices, loss_mask = self.draw(inputs.draws["mask"])
        return Contribution(student={"keep_indices": keep_indices}, loss_mask=loss_mask)

    def stats(self, step: int) -> dict[str, float]:
        return {"mask_ratio": self.config.ratio if self.active(step - 1) else 0.0}
