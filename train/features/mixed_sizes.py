"""Mixed-size batches as a training feature (``data.mixed_sizes``, FiT): batches draw across every latent size,
:func:`~dit.train.data.dataset.collate` pads each batch to one canvas and reports every sample's latent size, each
sample's noise is drawn at the largest size (so it ignores its batch's canvas); the student gets the ``image_sizes``
and the loss ignores the padding."""

from __future__ import annotations

from torch import nn

from ..config import TrainConfig
from ..data.buckets import Batching, repeats_note
from ..data.dataset import padding_mask
from .base import Contribution, Feature, StepInputs


class MixedSizes(Feature):
    """Batches that mix latent sizes, zero-padded at the bottom/right (see :mod:`dit.train.data.dataset`)."""

    name = "mixed_sizes"
    label = "data.mixed_sizes (batches of mixed sizes)"
    off = "set data.mixed_sizes to false (one size bucket per batch)"
    excludes = frozenset({"masking", "controlnet"})
    needs = {"supports_image_sizes": "takes per-sample image_sizes (FiTTransformer)"}

    @classmethod
    def from_config(cls, config: TrainConfig, backbone: nn.Module) -> MixedSizes | None:
        """The feature when ``data.mixed_sizes`` is on, else None."""
        return cls() if config.data.mixed_sizes else None

    def batching(self, dataset, global_batch: int) -> Batching:
        """One bucket of every sample (batches mix sizes), padded, with the noise drawn at the largest size."""
        total = len(dataset)
        line = f"training on {total} of {total} samples (mixed sizes: batches draw across all latent sizes)"
        line += repeats_note(total, global_batch) if total < global_batch else ""
        return Batching([list(range(total))], line, pad=True, draw_size=dataset.max_size)

    def contribute(self, inputs: StepInputs) -> Contribution:
        """The padded batch's ``image_sizes`` (B, 2) to the student, and a loss mask of each sample's valid region."""
        sizes = inputs.batch["image_sizes"]
        mask = padding_mask(sizes.to(inputs.latents.device, non_blocking=True), *inputs.latents.shape[-2:])
        return Contribution(student={"image_sizes": sizes}, loss_mask=mask)
