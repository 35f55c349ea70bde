"""Choosing the size to sample at (PixArt's aspect-ratio bins, or the nearest size the model can take) and the
resolution-dependent timestep shift of flow-matching sampling."""

from __future__ import annotations

import math

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from .checks import SamplingValueError

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


def sampling_size(height: int, width: int, resolution: int | None, multiple: int, binning: bool) -> tuple[int, int]:
    """The (height, width) in pixels to sample at for a requested size.

    ``resolution`` is the model's training side in pixels (``sample_size * vae_scale_factor``), or None for a model
    trained at native sizes and aspect ratios (FiT), which has no bins.
    With ``binning``: PixArt's aspect-ratio bin where that resolution has bins (256/512/1024/2048 px), else the
    nearest size divisible by ``multiple`` (VAE factor x patch size) instead of diffusers' "Invalid sample size".
    Without: the size itself, which must then divide into patches.
    """
    if height <= 0 or width <= 0:
        raise SamplingValueError(f"height and width must be positive, got {height}x{width}.")
    if binning:
        bins = ASPECT_RATIO_BINS.get(resolution)
        if bins is not None:
            return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
        return nearest_multiple(height, multiple), nearest_multiple(width, multiple)
    if height % multiple or width % multiple:
        raise SamplingValueError(
            f"Image size {height}x{width} does not divide into patches: height and width must be multiples of "
            f"{multiple} (VAE factor x patch size). Pass use_resolution_binning=True to snap to the nearest valid size."
        )
    return height, width


def flow_match_scheduler(train_tokens: int, num_train_timesteps: int = 1000) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with a resolution-dependent shift for a rectified-flow model
    trained (unshifted) at ``train_tokens`` image tokens.

    ``use_dynamic_shifting``: the pipeline passes ``mu`` (:func:`flow_shift_mu`), the sigmas become
    ``shift * s / (1 + (shift - 1) * s)`` with ``shift = exp(mu)``. Anchors: shift 1 (``mu = 0``) at the training
    token count, as the model was trained, and shift 2 (``mu = ln 2``) at 4x the tokens, which is SD3's rule
    ``shift = sqrt(tokens / train_tokens)`` at both points; diffusers interpolates ``mu`` linearly in between.
    """
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps,
        use_dynamic_shifting=True,
        base_image_seq_len=train_tokens,
        max_image_seq_len=4 * train_tokens,
        base_shift=0.0,
        max_shift=math.log(2.0),
    )


def flow_shift_mu(scheduler, image_tokens: int) -> float | None:
    """``mu`` for ``scheduler.set_timesteps`` at ``image_tokens`` tokens, or None for a scheduler without dynamic
    shifting (its own static ``shift`` applies then).

    diffusers' SD3 / Flux ``calculate_shift``, read from the scheduler's config: ``mu`` linear in the token count
    through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``.
    """
    config = scheduler.config
    if not getattr(config, "use_dynamic_shifting", False):
        return None
    return calculate_shift(
        image_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
