"""ControlNet training (PixArt-δ): a frozen base with a trainable adapter, control latents in the feature shards.

The trainer's model becomes a :class:`ControlledTransformer` when ``controlnet`` is configured (the training feature
:class:`ControlNetTraining`): only the adapter's parameters require gradients (so the optimizer, EMA, gradient
clipping and DDP see the adapter alone), its forward is the base's with the batch's ``control_latent`` injected, and
``save_pretrained`` writes the adapter folder; the trainer reads the base's config and null caption from the base it
keeps (``trainer.backbone``), and the run's ``output_dir/pipeline`` is a ``ControlNetPipeline`` of that base and the
trained adapter (:meth:`ControlNetTraining.pipeline_parts`). The control images go through the VAE once, at feature
extraction (:class:`~dit.train.extract.feature_writer.ControlFeatureWriter`), like the images: ``dit extract --control
silhouette|edges`` computes them from each image (:func:`~dit.train.extract.control_images.control_from_image`), and
``--control FOLDER`` reads one control image per image (:func:`~dit.train.extract.control_images.load_control_image`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dit.models.controlnet import ControlNetAdapter, block_controls
from dit.pipelines.controlnet import ControlNetPipeline

from ..config import ConfigError, TrainConfig
from ..extract.feature_writer import CONTROL_KEY
from .base import Contribution, Feature, PipelineParts, Run, StepInputs


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

    def train(self, mode: bool = True) -> ControlledTransformer:
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout in the base, as PixArt-δ
        return self

    def forward(self, hidden_states: torch.Tensor, *args, controlnet_cond: torch.Tensor | None = None, **kwargs):
        """The base forward (same arguments) with ``controlnet_cond`` (B, C, H, W), the control latents."""
        if controlnet_cond is None:
            raise ValueError(
                f"ControlNet training needs control latents: the feature shards must carry {CONTROL_KEY!r} (write "
                "them with dit.train.extract.feature_writer.ControlFeatureWriter)."
            )
        controls = block_controls(self.transformer, self.controlnet, controlnet_cond, self.conditioning_scale)
        return self.transformer(hidden_states, *args, block_controls=controls, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The adapter's folder (the base is not written: it is the run's ``model.pretrained``)."""
        self.controlnet.save_pretrained(save_directory, **kwargs)


class ControlNetTraining(Feature):
    """ControlNet training as a feature: the trained model becomes a :class:`ControlledTransformer` around the base
    backbone, and the student's call gets the batch's control latents."""

    name = "controlnet"
    label = "ControlNet training (controlnet.*)"
    off = "unset controlnet.num_blocks, positions and pretrained"
    excludes = frozenset({"masking", "mixed_sizes"})
    needs = {"supports_block_controls": "runs ControlNet adapters in its block loop (block_controls)"}
    freezes_base = True

    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: TrainConfig, backbone: nn.Module) -> ControlNetTraining | None:
        """The feature when ``controlnet`` is configured, else None."""
        return cls(config) if config.controlnet.enabled else None

    def check(self, backbone: nn.Module) -> None:
        config, cfg = self.config, self.config.controlnet
        if not (config.model.pretrained or config.model.inherit_from):
            raise ConfigError(
                "controlnet: a ControlNet trains on a trained base; set model.pretrained (a transformer folder)."
            )
        if cfg.num_blocks is not None and cfg.positions is not None:
            raise ConfigError("controlnet.num_blocks and controlnet.positions exclude each other; set one.")
        if cfg.pretrained and (cfg.num_blocks is not None or cfg.positions is not None):
            raise ConfigError(
                "controlnet.pretrained fixes the adapter's blocks; leave num_blocks and positions unset."
            )
        if config.model.lora_rank:
            raise ConfigError("controlnet: the base is frozen and the adapter trains; unset model.lora_rank.")
        if config.validation.every:
            raise ConfigError(
                "controlnet: validation sampling needs control images; set validation.every=0 and sample the "
                "checkpoint's adapter with dit.pipelines.ControlNetPipeline."
            )

    def wrap(self, model: nn.Module) -> ControlledTransformer:
        """The base ``model`` frozen, with a new (or ``controlnet.pretrained``) adapter that trains."""
        cfg = self.config.controlnet
        if cfg.pretrained:
            adapter = ControlNetAdapter.from_pretrained(cfg.pretrained)
            adapter.to(next(model.parameters()).device)
        elif cfg.positions is not None:
            adapter = ControlNetAdapter.from_transformer(model, positions=cfg.positions)
        else:
            adapter = ControlNetAdapter.from_transformer(model, num_blocks=cfg.num_blocks)
        adapter.set_attention_backend(self.config.model.attention_backend)
        if self.config.model.gradient_checkpointing:
            adapter.enable_gradient_checkpointing(selective=self.config.model.gradient_checkpointing == "selective")
        return ControlledTransformer(model, adapter, cfg.conditioning_scale)

    def contribute(self, inputs: StepInputs) -> Contribution:
        """The batch's control latents (B, C, h, w) as ``controlnet_cond`` (None when the shards have none, which
        :meth:`ControlledTransformer.forward` refuses)."""
        control = inputs.batch.get(CONTROL_KEY)
        device = inputs.latents.device
        return Contribution(
            student={"controlnet_cond": None if control is None else control.to(device, non_blocking=True)}
        )

    def pipeline_parts(self, run: Run, weights: Path) -> PipelineParts:
        """A ``ControlNetPipeline`` of the frozen base (``run.backbone``) and the trained adapter of ``weights``."""
        adapter = ControlNetAdapter.from_pretrained(weights)
        return PipelineParts(ControlNetPipeline, {"transformer": run.backbone, "controlnet": adapter})
