"""Mixed-size batches as a training feature (``data.mixed_sizes``, FiT): :func:`~dit.train.data.collate` pads each
batch to one canvas and reports every sample's latent size; the student gets those ``image_sizes`` and the loss
ignores the padding."""

from __future__ import annotations

from torch import nn

from .config import TrainConfig
from .data import padding_mask
from .features import Contribution, Feature, StepInputs


class MixedSizes(Feature):
    """Batches that mix latent sizes, zero-padded at the bottom/right (see :mod:`dit.train.data`)."""

    name = "mixed_sizes"
    label = "data.mixed_sizes (batches of mixed sizes)"
    off = "set data.mixed_sizes to false (one size bucket per batch)"
    excludes = frozenset({"masking", "controlnet"})
    needs = {"supports_image_sizes": "takes per-sample image_sizes (FiTTransformer)"}

    @classmethod
    def from_config(cls, config: TrainConfig, backbone: nn.Module) -> MixedSizes | None:
        """The feature when ``data.mixed_sizes`` is on, else None."""
        return cls() if config.data.mixed_sizes else None

    def contribute(self, inputs: StepInputs) -> Contribution:
        """The padded batch's ``image_sizes`` (B, 2) to the student, and a loss mask of each sample's valid region."""
        sizes = inputs.batch["image_sizes"]
        mask = padding_mask(sizes.to(inputs.latents.device, non_blocking=True), *inputs.latents.shape[-2:])
        return Contribution(student={"image_sizes": sizes}, loss_mask=mask)
