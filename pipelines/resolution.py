"""Choosing the size to sample at: PixArt's aspect-ratio bins, or the nearest size the model can take."""

from __future__ import annotations

from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

#: training resolution in pixels (``sample_size * vae_scale_factor``) -> PixArt's aspect-ratio bins for it.
#: Keyed by pixels, not by latent side as diffusers does: the same for PixArt's 8x VAEs, and a model with another
#: VAE factor (the 2x MicroShapes model: sample_size 32 = 64 px) is not sent to the 256-px bins.
ASPECT_RATIO_BINS = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
}


def nearest_multiple(value: int, multiple: int) -> int:
    """The positive multiple of ``multiple`` nearest to ``value``."""
    return max(multiple, int(round(value / multiple)) * multiple)


def sampling_size(height: int, width: int, resolution: int, multiple: int, binning: bool) -> tuple[int, int]:
    """The (height, width) in pixels to sample at for a requested size.

    ``resolution`` is the model's training side in pixels (``sample_size * vae_scale_factor``).
    With ``binning``: PixArt's aspect-ratio bin where that resolution has bins (256/512/1024/2048 px), else the
    nearest size divisible by ``multiple`` (VAE factor x patch size) instead of diffusers' "Invalid sample size".
    Without: the size itself, which must then divide into patches.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}.")
    if binning:
        bins = ASPECT_RATIO_BINS.get(resolution)
        if bins is not None:
            return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
        return nearest_multiple(height, multiple), nearest_multiple(width, multiple)
    if height % multiple or width % multiple:
        raise ValueError(
            f"Image size {height}x{width} does not divide into patches: height and width must be multiples of "
            f"{multiple} (VAE factor x patch size). Pass use_resolution_binning=True to snap to the nearest valid size."
        )
    return height, width
