"""ControlNet training (PixArt-δ): a frozen base with a trainable adapter, control latents in the feature shards.

The trainer's model becomes a :class:`ControlledTransformer` when ``controlnet`` is configured: only the adapter's
parameters require gradients (so the optimizer, EMA, gradient clipping and DDP see the adapter alone), its forward
is the base's with the batch's ``control_latent`` injected, and ``save_pretrained`` writes the adapter folder. The
control images go through the VAE once, at feature extraction (:class:`ControlFeatureWriter`), like the images:
``dit extract --control silhouette|edges`` computes them from each image (:func:`control_from_image`), and
``--control FOLDER`` reads one control image per image (:func:`load_control_image`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dit.models.controlnet import ControlNetAdapter, block_controls

from .config import ConfigError, TrainConfig
from .feature_writer import CONTROL_KEY


class ControlledTransformer(nn.Module):
    """A frozen backbone and a trainable ControlNet adapter, called like the backbone plus ``controlnet_cond``.

    Args:
        transformer: the base backbone (frozen here, kept in eval mode).
        controlnet: the adapter to train.
        conditioning_scale: residual scale during training.
    """

    def __init__(self, transformer: nn.Module, controlnet: ControlNetAdapter, conditioning_scale: float = 1.0):
        super().__init__()
        controlnet.check_compatible(transformer)
        self.transformer = transformer.requires_grad_(False).eval()
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    # The trainer reads these from its model; they are the base's.
    @property
    def config(self):
        return self.transformer.config

    @property
    def use_additional_conditions(self) -> bool:
        return getattr(self.transformer, "use_additional_conditions", False)

    @property
    def y_embedding(self) -> nn.Parameter:
        return self.transformer.y_embedding  # AttributeError when the base has no learned null caption

    def null_caption(self, batch_size: int, length: int) -> torch.Tensor:
        return self.transformer.null_caption(batch_size, length)

    def train(self, mode: bool = True) -> ControlledTransformer:
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout in the base, as PixArt-δ
        return self

    def forward(self, hidden_states: torch.Tensor, *args, controlnet_cond: torch.Tensor | None = None, **kwargs):
        """The base forward (same arguments) with ``controlnet_cond`` (B, C, H, W), the control latents."""
        if controlnet_cond is None:
            raise ValueError(
                f"ControlNet training needs control latents: the feature shards must carry {CONTROL_KEY!r} (write "
                "them with train.controlnet.ControlFeatureWriter)."
            )
        controls = block_controls(self.transformer, self.controlnet, controlnet_cond, self.conditioning_scale)
        return self.transformer(hidden_states, *args, block_controls=controls, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The adapter's folder (the base is not written: it is the run's ``model.pretrained``)."""
        self.controlnet.save_pretrained(save_directory, **kwargs)


def controlnet_model(transformer: nn.Module, config: TrainConfig) -> ControlledTransformer:
    """The trainer's model for a ControlNet run on ``transformer`` (the base built from ``model.*``)."""
    cfg = config.controlnet
    _check_config(config)
    if cfg.pretrained:
        adapter = ControlNetAdapter.from_pretrained(cfg.pretrained)
        adapter.to(next(transformer.parameters()).device)
    elif cfg.positions is not None:
        adapter = ControlNetAdapter.from_transformer(transformer, positions=cfg.positions)
    else:
        adapter = ControlNetAdapter.from_transformer(transformer, num_blocks=cfg.num_blocks)
    if config.model.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return ControlledTransformer(transformer, adapter, cfg.conditioning_scale)


def _check_config(config: TrainConfig) -> None:
    cfg = config.controlnet
    if not (config.model.pretrained or config.model.inherit_from):
        raise ConfigError(
            "controlnet: a ControlNet trains on a trained base; set model.pretrained (a transformer folder)."
        )
    if cfg.num_blocks is not None and cfg.positions is not None:
        raise ConfigError("controlnet.num_blocks and controlnet.positions exclude each other; set one.")
    if cfg.pretrained and (cfg.num_blocks is not None or cfg.positions is not None):
        raise ConfigError("controlnet.pretrained fixes the adapter's blocks; leave num_blocks and positions unset.")
    if config.model.lora_rank:
        raise ConfigError("controlnet: the base is frozen and the adapter trains; unset model.lora_rank.")
    if config.objective.distill or config.objective.distill_teacher:
        raise ConfigError("controlnet: distillation (objective.distill / distill_teacher) is not for adapters.")
    if config.validation.every:
        raise ConfigError(
            "controlnet: validation sampling needs control images; set validation.every=0 and sample the "
            "checkpoint's adapter with dit.pipelines.ControlNetPipeline."
        )
