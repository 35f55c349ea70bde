"""Checks of the values a sampling call takes, one function per concern.

Each bad value is a :class:`SamplingValueError` (a ``ValueError``) naming the value, the allowed range and what to do,
raised before any work starts (no text encoding, no transformer call). Pipelines and ``dit generate`` share these
functions; this module imports neither diffusers nor transformers, so the CLI can check its arguments first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

#: Largest image side accepted, in pixels. A cap rather than a memory estimate: it stops a typo (100000 px) from
#: allocating tens of GB or running for minutes; real models sample at most 4096 px (PixArt-Σ 4K).
MAX_SIDE = 16384
#: Largest number of image tokens per image (latent side / patch size, squared), 2**18: 4x PixArt-Σ's 4K (65536).
#: Self-attention memory grows with its square. Pipelines read it from ``max_image_tokens``, which may be raised.
MAX_IMAGE_TOKENS = 2**18


class SamplingValueError(ValueError):
    """A sampling argument outside its allowed range (the message names the value, the range and what to do)."""


def is_int(value) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value) -> float | None:
    """``value`` as a float, or None when it is not a real number (a string, a bool, a list, ...)."""
    if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Real, torch.Tensor)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def check_guidance_scale(guidance_scale) -> None:
    """A finite number >= 0 (NaN would silently disable classifier-free guidance, inf gives a black image)."""
    value = _as_float(guidance_scale)
    if value is None or not math.isfinite(value) or value < 0:
        raise SamplingValueError(
            f"guidance_scale must be a finite number >= 0, got {guidance_scale!r} (1 means no guidance; models are "
            "typically sampled at 1.5-7)."
        )


def check_guidance_channels(guidance_channels, latent_channels: int | None = None) -> None:
    """None (guide every latent channel) or an int in [1, ``latent_channels``]: classifier-free guidance acts on the
    first k latent channels only and keeps the conditional prediction on the others (FiT's published models: 3)."""
    if guidance_channels is None:
        return
    top = latent_channels if latent_channels is not None else math.inf
    if not is_int(guidance_channels) or not 1 <= guidance_channels <= top:
        upto = f" and <= {latent_channels} (the model's latent channels)" if latent_channels is not None else ""
        raise SamplingValueError(
            f"guidance_channels must be None (guide every latent channel) or an int >= 1{upto}, got "
            f"{guidance_channels!r} (FiT's published models guide the first 3 of 4)."
        )


def check_num_inference_steps(num_inference_steps, timesteps=None, sigmas=None) -> None:
    """An int >= 1, unless explicit ``timesteps`` or ``sigmas`` set the schedule."""
    if timesteps is not None or sigmas is not None:
        return
    if not is_int(num_inference_steps) or num_inference_steps < 1:
        raise SamplingValueError(
            f"num_inference_steps must be an int >= 1, got {num_inference_steps!r} (the number of denoising steps: "
            "typically 20, or 1-4 for an LCM student)."
        )


def check_eta(eta) -> None:
    """DDIM's noise weight: a number in [0, 1] (0: deterministic, 1: DDPM-like)."""
    value = _as_float(eta)
    if value is None or not 0.0 <= value <= 1.0:
        raise SamplingValueError(f"eta must be a number in [0, 1], got {eta!r} (0: deterministic DDIM, 1: DDPM).")


def check_num_images_per_prompt(num_images_per_prompt, name: str = "num_images_per_prompt") -> None:
    """Images per prompt (or per class label, ``name``): an int >= 1."""
    if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise SamplingValueError(f"{name} must be an int >= 1, got {num_images_per_prompt!r}.")


def check_callback_steps(callback_steps) -> None:
    """How often the legacy ``callback`` runs: an int >= 1 (checked with or without a callback, as diffusers does)."""
    if not is_int(callback_steps) or callback_steps < 1:
        raise SamplingValueError(f"callback_steps must be an int >= 1, got {callback_steps!r}.")


def check_prompt(prompt, prompt_embeds: torch.Tensor | None = None) -> int:
    """The number of prompts: ``prompt`` is a string or a non-empty list of strings (or None with ``prompt_embeds``)."""
    if prompt is None:
        if prompt_embeds is None:
            raise SamplingValueError("Pass either prompt (a string or a list of strings) or prompt_embeds.")
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    wrong = [p for p in prompt if not isinstance(p, str)] if isinstance(prompt, (list, tuple)) else None
    if not prompt or wrong is None or wrong:
        got = f"a list holding {wrong[0]!r}" if wrong else repr(prompt)
        raise SamplingValueError(f"prompt must be a string or a non-empty list of strings, got {got}.")
    return len(prompt)


def check_image_side(name: str, value) -> None:
    """``height`` or ``width`` in pixels: None (the model's default) or an int in [1, MAX_SIDE]."""
    if value is None:
        return
    if not is_int(value) or not 1 <= value <= MAX_SIDE:
        raise SamplingValueError(
            f"{name} must be an int between 1 and {MAX_SIDE} pixels, got {value!r} (for a larger image, sample a "
            "smaller size and upscale it)."
        )


def check_image_tokens(height: int, width: int, multiple: int, max_tokens: int) -> None:
    """The image tokens of a ``height`` x ``width`` sample (patch grid h * w) stay within ``max_tokens``."""
    tokens = (height // multiple) * (width // multiple)
    if tokens > max_tokens:
        raise SamplingValueError(
            f"{width}x{height} (WxH) is {tokens} image tokens for this model (one per {multiple}x{multiple} pixels); "
            f"the cap is {max_tokens}. Sample a smaller size (at most about {math.isqrt(max_tokens) * multiple} px "
            "square), or raise pipe.max_image_tokens if your device has the memory."
        )


def check_latents(latents: torch.Tensor | None, shape: Sequence[int]) -> None:
    """User latents: the expected ``shape`` (B, C, H/f, W/f) and finite values."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise SamplingValueError(
            f"latents have shape {got}; expected {tuple(shape)} (batch = prompts x num_images_per_prompt, the "
            "model's latent channels, height and width / VAE factor)."
        )
    if not bool(torch.isfinite(latents).all()):
        raise SamplingValueError("latents hold NaN or infinite values; pass finite noise (e.g. torch.randn).")
