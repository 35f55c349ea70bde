"""Choosing the size to sample at: PixArt's aspect-ratio bins, or the nearest size the model can take."""

from __future__ import annotations

from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

#: transformer ``sample_size`` (latent side) -> PixArt's aspect-ratio bins for that resolution
ASPECT_RATIO_BINS = {
    32: ASPECT_RATIO_256_BIN,
    64: ASPECT_RATIO_512_BIN,
    128: ASPECT_RATIO_1024_BIN,
    256: ASPECT_RATIO_2048_BIN,
}


def nearest_multiple(value: int, multiple: int) -> int:
    """The positive multiple of ``multiple`` nearest to ``value``."""
    return max(multiple, int(round(value / multiple)) * multiple)


def sampling_size(height: int, width: int, sample_size: int, multiple: int, binning: bool) -> tuple[int, int]:
    """The (height, width) in pixels to sample at for a requested size.

    With ``binning``: PixArt's aspect-ratio bin where ``sample_size`` has bins (256/512/1024/2048 px), else the
    nearest size divisible by ``multiple`` (VAE factor x patch size) instead of diffusers' "Invalid sample size".
    Without: the size itself, which must then divide into patches.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}.")
    if binning:
        bins = ASPECT_RATIO_BINS.get(sample_size)
        if bins is not None:
            return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
        return nearest_multiple(height, multiple), nearest_multiple(width, multiple)
    if height % multiple or width % multiple:
        raise ValueError(
            f"Image size {height}x{width} does not divide into patches: height and width must be multiples of "
            f"{multiple} (VAE factor x patch size). Pass use_resolution_binning=True to snap to the nearest valid size."
        )
    return height, width
