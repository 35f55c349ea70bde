"""Training features as plug-ins: what a run adds to plain training (token masking, mixed-size batches, a ControlNet
adapter, a distillation objective), and the one check of which of them a run may combine.

A :class:`Feature` declares its ``name``, the features it ``excludes`` and the backbone capabilities it ``needs``
(class attributes the backbones declare, :func:`capability`), and hooks into the run at fixed points: it may wrap the
trained model, decide how samples are batched, prepare what it keeps once the model is placed, contribute keyword
arguments to the student's call and a loss mask to every step, register state for checkpoints, follow the optimizer
steps, log figures, and at the end decide what the run's pipeline folder holds and write an export of its own. The
loop and the run's outputs call these hooks on every feature alike; they know none of them by name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from dit.models.capabilities import capability

from ..config import ConfigError
from ..data.buckets import Batching


@dataclass
class StepInputs:
    """What one micro-step offers the features.

    Args:
        step: the optimizer step (0-based).
        batch: the collated batch (host tensors; ``image_sizes``, ``control_latent``, ... when the shards have them).
        latents: (B, C, H, W) clean latents on the device.
        draws: the step's per-sample random draws (:func:`~dit.train.data.step_inputs.sample_draws`).
    """

    step: int
    batch: dict[str, Any]
    latents: torch.Tensor
    draws: dict[str, torch.Tensor]


@dataclass
class Contribution:
    """What a feature adds to one step: keyword arguments of the student's call, and a (B, 1, H, W) loss mask (1
    where the loss counts)."""

    student: dict[str, Any] = field(default_factory=dict)
    loss_mask: torch.Tensor | None = None


@dataclass
class PipelineParts:
    """What a run's ``output_dir/pipeline`` holds besides its scheduler and encoders: the pipeline class and its
    models by component name (``transformer``, and a ControlNet run's ``controlnet``)."""

    pipeline_class: type
    models: dict[str, nn.Module]


class Run(Protocol):
    """What a feature may read from the trainer in :meth:`Feature.prepare` and :meth:`Feature.export`."""

    accelerator: Any  # accelerate.Accelerator
    config: Any  # TrainConfig
    root: Path  # output_dir
    model: nn.Module  # the trained model, as prepared (possibly wrapped for DDP)
    backbone: nn.Module  # the base backbone, unwrapped (a ControlNet run's frozen base)
    ema: Any  # EMA or None

    def empty_caption(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s unconditional caption (its learned null caption, else the extracted empty one), on the host."""
        ...


class Feature:
    """Base class of a training feature; every hook does nothing here."""

    #: the feature's name, as :attr:`excludes` lists it
    name: ClassVar[str] = ""
    #: how messages name it (with the setting that turns it on)
    label: ClassVar[str] = ""
    #: how to turn it off
    off: ClassVar[str] = ""
    #: names of the features it cannot be combined with (either side may declare a pair)
    excludes: ClassVar[frozenset[str]] = frozenset()
    #: backbone capabilities it needs -> what they mean, for the message that refuses a backbone without one
    needs: ClassVar[dict[str, str]] = {}
    #: whether the base model stays frozen (its objective must be the base's)
    freezes_base: ClassVar[bool] = False

    def check(self, backbone: nn.Module) -> None:
        """Refuse, with a ConfigError, what the feature cannot train beyond :attr:`needs` (settings, instance
        properties of ``backbone``)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train in place of ``model`` (before it is placed)."""
        return model

    def batching(self, dataset: Any, global_batch: int) -> Batching | None:
        """How the run batches the samples of ``dataset`` (a :class:`~dit.train.data.dataset.FeatureDataset`) when the
        feature decides it; None: one latent size per batch (:func:`~dit.train.data.buckets.bucketed`)."""
        return None

    def prepare(self, run: Run) -> None:
        """Make what the feature keeps beside the model, on its device (after ``accelerator.prepare``)."""

    def captions(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Captions the feature substitutes (``uncond``: a network's unconditional branch), on the host; the loop
        moves them to the device and keeps the text of every batch long enough for them."""
        return {}

    def checkpoint_states(self) -> list[Any]:
        """Objects with ``state_dict`` / ``load_state_dict`` that checkpoints must hold (registered in order)."""
        return []

    def needs_token_draws(self, step: int) -> bool:
        """Whether optimizer step ``step`` needs a (H, W) grid of uniforms per sample (``draws["mask"]``)."""
        return False

    def contribute(self, inputs: StepInputs) -> Contribution:
        """What the feature adds to the student's call and to the loss mask of one micro-step."""
        return Contribution()

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Follow an optimizer step of ``model`` (unwrapped)."""

    def stats(self, step: int) -> dict[str, float]:
        """Figures to log after optimizer step ``step`` (1-based: the step just taken)."""
        return {}

    def pipeline_parts(self, run: Run, weights: Path) -> PipelineParts | None:
        """What ``output_dir/pipeline`` holds when the feature decides it, made from ``weights`` (the latest
        checkpoint's folder of the trained model: its EMA when kept); None: the trained backbone in a
        :class:`~dit.pipelines.TextToImagePipeline`."""
        return None

    def export(self, run: Run) -> Path | None:
        """Write what the feature leaves besides the run's pipeline (main process, at the end); its path or None."""
        return None


def check_features(features: list[Feature], backbone: nn.Module) -> None:
    """The one check of a run's feature set, at trainer start: every pair must combine, the backbone must declare
    every capability a feature needs, and each feature's own :meth:`Feature.check` must pass. A ConfigError names the
    features (both, for a pair) and the setting to change."""
    for a, b in itertools.combinations(features, 2):
        if b.name in a.excludes or a.name in b.excludes:
            raise ConfigError(f"{a.label} does not combine with {b.label}; turn one off ({a.off}, or {b.off}).")
    for feature in features:
        for name, meaning in feature.needs.items():
            if not capability(backbone, name):
                raise ConfigError(
                    f"{feature.label} needs a backbone that {meaning}; {type(backbone).__name__} does not ({name} is "
                    f"false). {feature.off[0].upper()}{feature.off[1:]} to train without it."
                )
        feature.check(backbone)


def merge(contributions: list[Contribution]) -> Contribution:
    """One step's contributions as one: the student's keyword arguments together, the loss masks multiplied."""
    merged = Contribution()
    for part in contributions:
        merged.student.update(part.student)
        if part.loss_mask is not None:
            merged.loss_mask = part.loss_mask if merged.loss_mask is None else merged.loss_mask * part.loss_mask
    return merged
